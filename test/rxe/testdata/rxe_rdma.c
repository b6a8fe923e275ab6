/*
 * rxe_rdma: the rdma_rxe end of test/rxe's RDMA WRITE and READ check,
 * against `hfictl rdma-check` (tools/hfictl/cmds_rdmacheck.go, which
 * describes the exchange). Built on the host against libibverbs, run in
 * the QEMU guest against the guest's libibverbs.so.1 and librxe.
 *
 *   rxe_rdma [-p PORT] [-s SIZE] [-g GID_INDEX] [HOST]
 *
 * Without HOST it waits for the initiator (the target); with HOST it is
 * the initiator. Exit status 0 when every check passed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <infiniband/verbs.h>

struct dest {
	uint32_t qpn, psn, seed, rkey;
	uint64_t addr, size;
	union ibv_gid gid;
};

static unsigned char pat(uint32_t seed, uint64_t k)
{
	return (unsigned char)(seed + k * 7 + (k >> 8) * 13);
}

static int die(const char *what)
{
	fprintf(stderr, "rxe_rdma: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void put_line(int fd, const struct dest *d)
{
	char line[160], gid[33];
	for (int i = 0; i < 16; i++)
		sprintf(gid + 2 * i, "%02x", d->gid.raw[i]);
	int n = snprintf(line, sizeof line, "%06x %06x %08x %s %016" PRIx64 " %08x %" PRIx64 "\n",
			 d->qpn, d->psn, d->seed, gid, d->addr, d->rkey, d->size);
	if (write(fd, line, n) != n)
		die("write address");
}

static int get_line(int fd, char *buf, size_t len)
{
	size_t n = 0;
	while (n + 1 < len) {
		ssize_t r = read(fd, buf + n, 1);
		if (r <= 0)
			return -1;
		if (buf[n] == '\n')
			break;
		n++;
	}
	buf[n] = 0;
	return 0;
}

static void parse_line(const char *line, struct dest *d)
{
	char gid[33];
	if (sscanf(line, "%x %x %x %32s %" SCNx64 " %x %" SCNx64, &d->qpn, &d->psn, &d->seed, gid,
		   &d->addr, &d->rkey, &d->size) != 7 || strlen(gid) != 32) {
		fprintf(stderr, "rxe_rdma: malformed address %s\n", line);
		exit(1);
	}
	for (int i = 0; i < 16; i++) {
		unsigned v;
		sscanf(gid + 2 * i, "%2x", &v);
		d->gid.raw[i] = v;
	}
}

static void post(struct ibv_qp *qp, struct ibv_mr *mr, enum ibv_wr_opcode op, void *local,
		 uint64_t remote, uint32_t rkey, uint32_t len)
{
	struct ibv_sge sge = { .addr = (uintptr_t)local, .length = len, .lkey = mr->lkey };
	struct ibv_send_wr wr = { .wr_id = op, .sg_list = &sge, .num_sge = 1, .opcode = op,
				  .send_flags = IBV_SEND_SIGNALED };
	struct ibv_send_wr *bad;
	wr.wr.rdma.remote_addr = remote;
	wr.wr.rdma.rkey = rkey;
	if (ibv_post_send(qp, &wr, &bad))
		die("ibv_post_send");
}

static void wait_wc(struct ibv_cq *cq, const char *what)
{
	struct ibv_wc wc;
	int n;
	while ((n = ibv_poll_cq(cq, 1, &wc)) == 0)
		;
	if (n < 0 || wc.status != IBV_WC_SUCCESS) {
		fprintf(stderr, "rxe_rdma: %s: %s\n", what, n < 0 ? "poll failed" : ibv_wc_status_str(wc.status));
		exit(1);
	}
}

static long check(const unsigned char *b, uint64_t n, uint32_t seed)
{
	for (uint64_t k = 0; k < n; k++)
		if (b[k] != pat(seed, k))
			return (long)k;
	return -1;
}

int main(int argc, char **argv)
{
	int port = 18516, gidx = 1, c;
	uint64_t size = 4096;
	while ((c = getopt(argc, argv, "p:s:g:")) != -1) {
		switch (c) {
		case 'p': port = atoi(optarg); break;
		case 's': size = strtoull(optarg, NULL, 0); break;
		case 'g': gidx = atoi(optarg); break;
		default: fprintf(stderr, "usage: rxe_rdma [-p PORT] [-s SIZE] [-g GID_INDEX] [HOST]\n"); return 2;
		}
	}
	const char *host = optind < argc ? argv[optind] : NULL;
	srand48(getpid());

	struct ibv_device **list = ibv_get_device_list(NULL);
	if (!list || !list[0])
		die("no RDMA device");
	struct ibv_context *ctx = ibv_open_device(list[0]);
	if (!ctx)
		die("ibv_open_device");
	struct ibv_pd *pd = ibv_alloc_pd(ctx);
	/* source [0, size): own pattern; sink [size, 2 size): zero */
	unsigned char *buf = calloc(1, 2 * size);
	struct dest me = { .seed = (uint32_t)lrand48(), .size = size, .psn = lrand48() & 0xffffff };
	for (uint64_t k = 0; k < size; k++)
		buf[k] = pat(me.seed, k);
	struct ibv_mr *mr = ibv_reg_mr(pd, buf, 2 * size,
				       IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
	struct ibv_cq *cq = ibv_create_cq(ctx, 4, NULL, NULL, 0);
	struct ibv_qp_init_attr qia = { .send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
		.cap = { .max_send_wr = 2, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1 } };
	struct ibv_qp *qp = pd && mr && cq ? ibv_create_qp(pd, &qia) : NULL;
	if (!qp)
		die("PD, MR, CQ or QP");
	struct ibv_qp_attr a = { .qp_state = IBV_QPS_INIT, .port_num = 1,
		.qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ };
	if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
		die("INIT");
	me.qpn = qp->qp_num;
	me.addr = (uintptr_t)buf;
	me.rkey = mr->rkey;
	if (ibv_query_gid(ctx, 1, gidx, &me.gid))
		die("ibv_query_gid");

	/* The exchange: the initiator writes its line first. */
	int fd;
	char line[160];
	struct dest rem;
	char service[16];
	snprintf(service, sizeof service, "%d", port);
	if (host) {
		struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *res;
		if (getaddrinfo(host, service, &hints, &res))
			die("getaddrinfo");
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen))
			die("connect");
		put_line(fd, &me);
		if (get_line(fd, line, sizeof line))
			die("read address");
	} else {
		struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
		int one = 1, l = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (l < 0 || bind(l, (struct sockaddr *)&sa, sizeof sa) || listen(l, 1))
			die("listen");
		fd = accept(l, NULL, NULL);
		close(l);
		if (fd < 0 || get_line(fd, line, sizeof line))
			die("read address");
	}
	parse_line(line, &rem);
	if (rem.size != size) {
		fprintf(stderr, "rxe_rdma: sizes differ: %" PRIu64 " here, %" PRIu64 " there\n", size, rem.size);
		return 1;
	}
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_RTR;
	a.path_mtu = IBV_MTU_1024;
	a.dest_qp_num = rem.qpn;
	a.rq_psn = rem.psn;
	a.max_dest_rd_atomic = 1;
	a.min_rnr_timer = 12;
	a.ah_attr.is_global = 1;
	a.ah_attr.grh.dgid = rem.gid;
	a.ah_attr.grh.sgid_index = gidx;
	a.ah_attr.grh.hop_limit = 1;
	a.ah_attr.port_num = 1;
	if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
			  IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER))
		die("RTR");
	a.qp_state = IBV_QPS_RTS;
	a.timeout = 14;
	a.retry_cnt = 7;
	a.rnr_retry = 7;
	a.sq_psn = me.psn;
	a.max_rd_atomic = 1;
	if (ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
			  IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC))
		die("RTS");
	if (!host)
		put_line(fd, &me); /* connected before the initiator hears back */

	if (host) {
		/* READ the target's source into the sink, check it; WRITE the
		 * source into the target's sink, and let it check. */
		post(qp, mr, IBV_WR_RDMA_READ, buf + size, rem.addr, rem.rkey, size);
		wait_wc(cq, "RDMA READ");
		long bad = check(buf + size, size, rem.seed);
		if (bad >= 0) {
			fprintf(stderr, "rxe_rdma: READ data differs at byte %ld\n", bad);
			return 1;
		}
		post(qp, mr, IBV_WR_RDMA_WRITE, buf, rem.addr + size, rem.rkey, size);
		wait_wc(cq, "RDMA WRITE");
		if (write(fd, "written\n", 8) != 8 || get_line(fd, line, sizeof line))
			die("written");
		if (strcmp(line, "ok")) {
			fprintf(stderr, "rxe_rdma: the target says: %s\n", line);
			return 1;
		}
		printf("rxe_rdma: READ %" PRIu64 " bytes checked here, WRITE %" PRIu64 " bytes checked there\n", size, size);
	} else {
		if (get_line(fd, line, sizeof line) || strcmp(line, "written"))
			die("waiting for written");
		long bad = check(buf + size, size, rem.seed);
		char reply[64];
		int n = bad < 0 ? snprintf(reply, sizeof reply, "ok\n")
				: snprintf(reply, sizeof reply, "bad WRITE data at byte %ld\n", bad);
		if (write(fd, reply, n) != n)
			die("reply");
		if (check(buf, size, me.seed) >= 0) {
			fprintf(stderr, "rxe_rdma: the source changed\n");
			return 1;
		}
		if (bad >= 0) {
			fprintf(stderr, "rxe_rdma: WRITE data differs at byte %ld\n", bad);
			return 1;
		}
		printf("rxe_rdma: WRITE %" PRIu64 " bytes checked here\n", size);
	}
	close(fd);
	ibv_destroy_qp(qp);
	ibv_destroy_cq(cq);
	ibv_dereg_mr(mr);
	ibv_dealloc_pd(pd);
	ibv_close_device(ctx);
	ibv_free_device_list(list);
	free(buf);
	return 0;
}
