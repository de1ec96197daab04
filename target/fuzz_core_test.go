package target

import (
	"encoding/binary"
	"testing"
)

// FuzzCoreEvents drives the session core with arbitrary sequences of events: PDUs of every
// kind with plausible and implausible fields, ticks, completions in any order, partial and
// delayed writes, and a close at any point. Whatever happens, the core must not panic, and
// once closed and drained it must hold nothing: no buffer, no ledger byte, no command slot.
func FuzzCoreEvents(f *testing.F) {
	f.Add([]byte{0, 0x21, 3, 1, 0, 0, 6, 7, 7})
	f.Add([]byte{0, 0x20, 4, 0, 1, 0, 1, 0, 0, 0, 0x13, 3, 1, 1, 7, 2})
	f.Add([]byte{7, 5, 0, 0x21, 4, 0, 1, 1, 3, 1, 1, 7, 0, 5, 0})
	f.Add([]byte{2, 1, 3, 2, 1, 3, 7, 5, 6, 6, 6, 6, 6})
	f.Add([]byte{4, 0x40, 4, 0, 4, 0, 5, 7, 3})
	f.Add([]byte{0xff, 0x01, 0x80, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := newCoreRig(t, withOptions(func(o *Options) { o.QueueDepth = 8 }), withLimits(Limits{BufferBytes: 8 << 20, Commands: 6}),
			withParams(func(p *params) { p.InitiatorRecvDSL, p.MaxBurstLength, p.FirstBurstLength = 8192, 65536, 16384 }))
		next := func() byte {
			if len(in) == 0 {
				return 0
			}
			b := in[0]
			in = in[1:]
			return b
		}
		lastTTT := uint32(reservedTag)
		sizes := []uint32{0, 512, 4096, 65536, 1 << 20, 48 << 20}
		for len(in) > 0 {
			op := next()
			switch op % 8 {
			case 0: // SCSI command
				fl := next()
				edtl := sizes[int(next())%len(sizes)]
				imm := min(int(next())*512, int(edtl))
				var cdb []byte
				switch next() % 4 {
				case 0:
					cdb = cdb10(0x28, 0, uint16(edtl/512))
				case 1:
					cdb = cdb10(0x2a, 0, uint16(edtl/512))
				case 2:
					cdb = []byte{0}
				default:
					cdb = []byte{0xee}
				}
				h := r.command(cdb, edtl, fl&1 != 0, fl&2 != 0, fl&4 != 0, fl&8 != 0)
				h.setU32(offITT, uint32(fl>>4)%8)
				if fl&0x80 != 0 {
					h.setU32(offCmdSN, h.u32(offCmdSN)+uint32(next()%3)-1)
				}
				r.feed(h, make([]byte, imm))
			case 1: // Data-Out
				itt := uint32(next() % 8)
				ttt := lastTTT
				if next()%4 == 0 {
					ttt = reservedTag
				}
				off := uint32(next()) * 512
				n := int(next()) * 64
				r.feed(dataOutHeader(itt, ttt, uint32(next()%3), off, next()%2 == 0), make([]byte, n))
			case 2: // NOP-Out
				b := next()
				itt := uint32(b % 4)
				if b&4 != 0 {
					itt = reservedTag
				}
				h := new(bhs)
				h[0] = opNopOut
				if b&8 != 0 {
					h[0] |= flagImmediate
				}
				h[1] = flagFinal
				h.setU32(offITT, itt)
				h.setU32(offCmdSN, r.cmdSN)
				r.feed(h, make([]byte, int(next())*1024))
			case 3: // TMF
				r.autoRun = r.autoRun && next()%2 == 0
				h := new(bhs)
				h[0] = opTMFReq | flagImmediate
				h[1] = flagFinal | next()%10
				h.setU32(offRTT, uint32(next()%8))
				h.setU32(offCmdSN, r.cmdSN)
				r.feed(h, nil)
			case 4: // Text
				b := next()
				h := new(bhs)
				h[0] = opTextReq | flagImmediate
				h[1] = b & flagContinue
				h.setU32(offITT, uint32(b%3))
				h.setU32(offTTT, reservedTag)
				data := []byte("SendTargets=All\x00")
				if b&1 != 0 {
					data = data[:int(next())%len(data)]
				}
				r.feed(h, data)
			case 5: // Logout
				h := new(bhs)
				h[0] = opLogoutReq | flagImmediate
				h[1] = flagFinal | next()%4
				binary.BigEndian.PutUint16(h[offCID:], 7)
				r.feed(h, nil)
			case 6:
				r.tick(1)
			case 7: // the edge: completions and writes in any order
				switch next() % 6 {
				case 0:
					if len(r.running) > 0 {
						t0 := r.running[0]
						r.running = r.running[1:]
						r.complete(t0, r.execute(t0))
					}
				case 1:
					if n := len(r.running); n > 0 {
						t0 := r.running[n-1]
						r.running = r.running[:n-1]
						r.complete(t0, r.execute(t0))
					}
				case 2:
					r.send()
				case 3:
					r.autoSend = !r.autoSend
				case 4:
					r.autoRun = !r.autoRun
				case 5:
					r.closeAndDrain()
					r.checkEmpty()
					return
				}
			}
			for _, fr := range r.wire {
				if fr.BHS.opcode() == opR2T {
					lastTTT = fr.BHS.u32(offTTT)
				}
			}
			r.wire = r.wire[:0]
			if op == 0xff && len(in) >= bhsLen {
				var h bhs
				copy(h[:], in[:bhsLen])
				in = in[bhsLen:]
				h[4] = 0 // no AHS: the edge reads it from the socket, not from here
				h.setDataLen(int(h.dataLen() % 4096))
				r.feed(&h, make([]byte, h.dataLen()))
			}
		}
		r.closeAndDrain()
		r.checkEmpty()
	})
}

// feed is pdu for the fuzzer: a landing that waits drops the PDU (the edge would offer it
// again later), and a landing of another size than the PDU's data is a bug in the core.
func (r *coreRig) feed(h *bhs, data []byte) {
	h.setDataLen(len(data))
	l := r.c.header(h, nil)
	r.after()
	if l.wait {
		return
	}
	if l.buf != nil && len(l.buf) != len(data) || l.buf == nil && l.skip != len(data) {
		r.t.Fatalf("landing of %d/%d bytes for a PDU of %d", len(l.buf), l.skip, len(data))
	}
	copy(l.buf, data)
	r.c.data(true)
	r.after()
}
