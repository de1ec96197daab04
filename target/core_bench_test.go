package target

import "testing"

// BenchmarkCoreRead4K is one 4 KiB READ through the core as the edge drives it: header, data,
// execution handed out, completion, Data-In written. It must not allocate.
func BenchmarkCoreRead4K(b *testing.B) { benchCore(b, false) }

// BenchmarkCoreWrite4K is one 4 KiB WRITE with immediate data landing in the command's buffer.
func BenchmarkCoreWrite4K(b *testing.B) { benchCore(b, true) }

func benchCore(b *testing.B, write bool) {
	r := newCoreRig(b)
	c := r.c
	cdb := cdb10(0x28, 0, 8)
	if write {
		cdb = cdb10(0x2a, 0, 8)
	}
	data := make([]byte, 4096)
	var h bhs
	var batch []*outPDU
	b.ReportAllocs()
	b.SetBytes(4096)
	for i := 0; b.Loop(); i++ {
		h = bhs{}
		h[0] = opSCSICmd
		h[1] = flagFinal | flagRead
		n := 0
		if write {
			h[1] = flagFinal | flagWrite
			n = 4096
		}
		h.setU32(offITT, uint32(i))
		h.setU32(offEDTL, 4096)
		h.setU32(offCmdSN, uint32(i+1))
		copy(h[32:], cdb)
		h.setDataLen(n)
		l := c.header(&h, nil)
		copy(l.buf, data)
		c.data(true)
		a := c.ready()
		t := a.run[0]
		c.advance()
		res := r.dev.Execute(&t.cmd)
		c.completed(t, res)
		c.advance()
		batch = c.takeSend(batch[:0])
		c.sent(batch)
	}
}
