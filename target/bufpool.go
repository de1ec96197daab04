package target

import (
	"math/bits"
	"sync"
)

// bufPool hands out data buffers in power-of-two size classes so a steady I/O load allocates
// nothing: a Data-Out lands in the buffer scsi reads from, and scsi fills the buffer Data-In
// PDUs are written from.
type bufPool struct {
	classes [numClasses]sync.Pool
}

const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 24 // 16 MiB
	numClasses    = maxClassShift - minClassShift + 1
	// maxTransfer bounds one command's buffer (larger expected lengths are refused).
	maxTransfer = 64 << 20
)

func classOf(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// get returns a buffer of length n (contents undefined).
func (p *bufPool) get(n int) *[]byte {
	c := classOf(n)
	if c >= numClasses {
		b := make([]byte, n)
		return &b
	}
	if v := p.classes[c].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(c+minClassShift))
	return &b
}

func (p *bufPool) put(b *[]byte) {
	c := classOf(cap(*b))
	if c >= numClasses || cap(*b) != 1<<(c+minClassShift) {
		return
	}
	p.classes[c].Put(b)
}

// syncPool is a typed sync.Pool of *T that allocates a zero T when empty.
type syncPool[T any] struct{ p sync.Pool }

func (sp *syncPool[T]) get() *T {
	if v := sp.p.Get(); v != nil {
		return v.(*T)
	}
	return new(T)
}

func (sp *syncPool[T]) put(v *T) { sp.p.Put(v) }
