// Package rcvarray is the bookkeeping of one receive context's slice of the
// HFI's RcvArray, the table of expected-receive buffers ("TIDs"), in the shape
// of hfi1's exp_rcv.c and user_exp_rcv.c:
//
//   - SplitPages and FindPhysBlocks cut a buffer into the power-of-two page
//     sets one RcvArray entry can describe (find_phys_blocks);
//   - Allocator hands out entries group by group from three lists of groups
//     (empty, partially used, full), in the order hfi1_user_exp_rcv_setup
//     uses them;
//   - EncodeTID and DecodeTID translate between an entry and the 32-bit TID
//     user space sees (uapi's EXP_TID_* fields), with the validation a
//     TID from user space needs.
//
// The package is pure logic: it programs nothing and pins nothing.
package rcvarray
