package userfault

// intervalTree holds subscriptions by their half-open range [start, end) and
// finds every one that overlaps a query range, like the kernel's
// interval_tree (an augmented rbtree). Here: a treap ordered by (start, id)
// whose nodes carry the largest end in their subtree, so a query skips
// subtrees that end before it. Priorities come from the id through a mixing
// function, so the shape is deterministic and needs no random source.
type intervalTree struct {
	root *itNode
	n    int
}

type itNode struct {
	sub         *Subscription
	prio        uint64
	maxEnd      uintptr
	left, right *itNode
}

func mix64(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}

func less(a, b *Subscription) bool {
	if a.start != b.start {
		return a.start < b.start
	}
	return a.id < b.id
}

func (n *itNode) update() {
	n.maxEnd = n.sub.end
	if n.left != nil && n.left.maxEnd > n.maxEnd {
		n.maxEnd = n.left.maxEnd
	}
	if n.right != nil && n.right.maxEnd > n.maxEnd {
		n.maxEnd = n.right.maxEnd
	}
}

// split divides t into nodes ordered before s and the rest.
func split(t *itNode, s *Subscription) (l, r *itNode) {
	if t == nil {
		return nil, nil
	}
	if less(t.sub, s) {
		t.right, r = split(t.right, s)
		t.update()
		return t, r
	}
	l, t.left = split(t.left, s)
	t.update()
	return l, t
}

func merge(l, r *itNode) *itNode {
	switch {
	case l == nil:
		return r
	case r == nil:
		return l
	case l.prio > r.prio:
		l.right = merge(l.right, r)
		l.update()
		return l
	default:
		r.left = merge(l, r.left)
		r.update()
		return r
	}
}

func (t *intervalTree) insert(s *Subscription) {
	n := &itNode{sub: s, prio: mix64(s.id), maxEnd: s.end}
	l, r := split(t.root, s)
	t.root = merge(merge(l, n), r)
	t.n++
}

func (t *intervalTree) remove(s *Subscription) bool {
	var removed bool
	t.root = removeNode(t.root, s, &removed)
	if removed {
		t.n--
	}
	return removed
}

func removeNode(n *itNode, s *Subscription, removed *bool) *itNode {
	if n == nil {
		return nil
	}
	switch {
	case n.sub == s:
		*removed = true
		return merge(n.left, n.right)
	case less(s, n.sub):
		n.left = removeNode(n.left, s, removed)
	default:
		n.right = removeNode(n.right, s, removed)
	}
	n.update()
	return n
}

// overlap calls fn for every subscription with start < end && sub.end > start,
// in address order.
func (t *intervalTree) overlap(start, end uintptr, fn func(*Subscription)) {
	overlapNode(t.root, start, end, fn)
}

func overlapNode(n *itNode, start, end uintptr, fn func(*Subscription)) {
	for n != nil {
		if n.maxEnd <= start {
			return
		}
		overlapNode(n.left, start, end, fn)
		if n.sub.start >= end {
			return // this node and everything to its right start too late
		}
		if n.sub.end > start {
			fn(n.sub)
		}
		n = n.right
	}
}

// each calls fn for every subscription in address order.
func (t *intervalTree) each(fn func(*Subscription)) {
	t.overlap(0, ^uintptr(0), fn)
}
