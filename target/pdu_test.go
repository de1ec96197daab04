package target

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"

	"nstarget/target/scsi"
)

func TestCRC32CMatchesRFC3720Vectors(t *testing.T) {
	// RFC 3720 appendix B.4: 32 bytes of zeros, of 0xff, and an incrementing pattern.
	zeros := make([]byte, 32)
	ones := bytes.Repeat([]byte{0xff}, 32)
	inc := make([]byte, 32)
	for i := range inc {
		inc[i] = byte(i)
	}
	for _, tc := range []struct {
		in   []byte
		want uint32
	}{{zeros, 0x8a9136aa}, {ones, 0x62a8ab43}, {inc, 0x46dd794e}} {
		if got := crc32c(0, tc.in); got != tc.want {
			t.Errorf("crc32c(% x...) = %08x, want %08x", tc.in[:4], got, tc.want)
		}
	}
}

// scsiCmdHeader is the BHS of a SCSI Command to LUN 0: fl is byte 1 (F, R, W), cdb at most 16
// bytes. Every test initiator builds its commands with it.
func scsiCmdHeader(itt, edtl, cmdSN uint32, fl byte, cdb []byte) bhs {
	var h bhs
	h[0] = opSCSICmd
	h[1] = fl
	h.setU32(offITT, itt)
	h.setU32(offEDTL, edtl)
	h.setU32(offCmdSN, cmdSN)
	copy(h[32:48], cdb)
	return h
}

// rwFlags is byte 1 of a SCSI Command.
func rwFlags(read, write, final bool) byte {
	var fl byte
	if final {
		fl |= flagFinal
	}
	if read {
		fl |= flagRead
	}
	if write {
		fl |= flagWrite
	}
	return fl
}

func TestPDURoundTripWithAHSDataPaddingAndDigests(t *testing.T) {
	cdb := make([]byte, 32) // a 32-byte CDB needs an Extended CDB AHS
	for i := range cdb {
		cdb[i] = byte(i + 1)
	}
	h := scsiCmdHeader(7, 4096, 11, flagFinal|flagRead, cdb[:16])
	binary.BigEndian.PutUint64(h[offLUN:], scsi.EncodeLUN(3))
	// Extended CDB AHS: length = 16 remaining bytes + 1 reserved, type 1, pad to 4.
	ahs := []byte{0, 17, 1, 0}
	ahs = append(ahs, cdb[16:]...)
	for len(ahs)%4 != 0 {
		ahs = append(ahs, 0)
	}
	data := []byte("hello, odd length") // 17 bytes: 3 bytes of padding
	for _, dig := range []struct{ hd, dd bool }{{false, false}, {true, false}, {false, true}, {true, true}} {
		wire := appendPDU(nil, &h, ahs, data, dig.hd, dig.dd)
		want := 48 + len(ahs) + 20
		if dig.hd {
			want += 4
		}
		if dig.dd {
			want += 4
		}
		if len(wire) != want {
			t.Fatalf("digests %+v: encoded %d bytes, want %d", dig, len(wire), want)
		}
		f, n, err := parsePDU(wire, dig.hd, dig.dd)
		if err != nil || n != len(wire) {
			t.Fatalf("digests %+v: parsePDU: n=%d err=%v", dig, n, err)
		}
		if !bytes.Equal(f.Data, data) || f.BHS.itt() != 7 || f.BHS.u32(offTTT) != 4096 || scsi.DecodeLUN(f.BHS.lunRaw()) != 3 {
			t.Fatalf("digests %+v: fields lost in round trip", dig)
		}
		var buf [maxCDBLen]byte
		got, err := cdbFromPDU(&f.BHS, f.AHS, buf[:])
		if err != nil || !bytes.Equal(got, cdb) {
			t.Fatalf("extended CDB = % x, %v; want % x", got, err, cdb)
		}
	}
}

func TestDigestMismatchIsDetected(t *testing.T) {
	h := scsiCmdHeader(1, 512, 1, flagFinal|flagRead, []byte{0x28})
	data := bytes.Repeat([]byte{0x5a}, 64)
	wire := appendPDU(nil, &h, nil, data, true, true)
	bad := append([]byte(nil), wire...)
	bad[20] ^= 1 // header byte
	if _, _, err := parsePDU(bad, true, true); !errors.Is(err, errDigest) {
		t.Fatalf("corrupt header: err = %v, want digest error", err)
	}
	bad = append([]byte(nil), wire...)
	bad[60] ^= 1 // data byte
	if _, _, err := parsePDU(bad, true, true); !errors.Is(err, errDigest) {
		t.Fatalf("corrupt data: err = %v, want digest error", err)
	}
	if _, _, err := parsePDU(wire[:len(wire)-1], true, true); err == nil {
		t.Fatal("truncated PDU parsed without error")
	}
}

func TestBadAHSLengthIsRejected(t *testing.T) {
	h := scsiCmdHeader(1, 0, 1, flagFinal|flagRead, []byte{0})
	ahs := []byte{0x10, 0, 1, 0} // claims 4096 bytes
	wire := appendPDU(nil, &h, ahs, nil, false, false)
	if _, _, err := parsePDU(wire, false, false); err == nil {
		t.Fatal("AHS longer than the header was accepted")
	}
}

func TestBufPoolClassesFitRequests(t *testing.T) {
	var p bufPool
	for _, n := range []int{1, 4096, 4097, 65536, 1 << 20, 3 << 20, 16 << 20, 20 << 20} {
		b := p.get(n)
		if len(*b) != n {
			t.Fatalf("get(%d) returned len %d", n, len(*b))
		}
		p.put(b)
		b2 := p.get(n)
		if len(*b2) != n {
			t.Fatalf("reused get(%d) returned len %d", n, len(*b2))
		}
	}
}

func FuzzParsePDU(f *testing.F) {
	h := scsiCmdHeader(9, 8192, 3, flagFinal|flagRead, []byte{0x2a, 0, 0, 0, 0, 1, 0, 0, 16, 0})
	f.Add(appendPDU(nil, &h, nil, []byte("immediate data"), false, false), false, false)
	f.Add(appendPDU(nil, &h, []byte{0, 5, 1, 0, 1, 2, 3, 4}, nil, true, true), true, true)
	var login bhs
	login[0] = opLoginReq | flagImmediate
	login[1] = flagTransit | 1<<2 | 3
	f.Add(appendPDU(nil, &login, nil, appendTextKeys(nil, []textKV{{"InitiatorName", "iqn.x"}}), false, false), false, false)
	f.Fuzz(func(t *testing.T, b []byte, hd, dd bool) {
		fr, n, err := parsePDU(b, hd, dd)
		if err != nil {
			return
		}
		if n > len(b) || len(fr.Data) != fr.BHS.dataLen() {
			t.Fatalf("n=%d len=%d data=%d/%d", n, len(b), len(fr.Data), fr.BHS.dataLen())
		}
		// Re-encoding a parsed PDU and parsing it again is stable.
		again := appendPDU(nil, &fr.BHS, fr.AHS, fr.Data, hd, dd)
		fr2, _, err := parsePDU(again, hd, dd)
		if err != nil || fr2.BHS != fr.BHS || !bytes.Equal(fr2.Data, fr.Data) {
			t.Fatalf("re-encode not stable: %v", err)
		}
	})
}

// appendPDU encodes a whole PDU, AHS included, into dst: the test initiator's encoder (the
// target encodes with appendIOV, and TestAppendIOVMatchesTheTestEncoder keeps them equal). ahs must be a multiple of 4 bytes.
func appendPDU(dst []byte, h *bhs, ahs, data []byte, headerDigest, dataDigest bool) []byte {
	hh := *h
	hh[4] = byte(len(ahs) / 4)
	hh.setDataLen(len(data))
	start := len(dst)
	dst = append(dst, hh[:]...)
	dst = append(dst, ahs...)
	if headerDigest {
		dst = binary.LittleEndian.AppendUint32(dst, crc32c(0, dst[start:]))
	}
	if len(data) > 0 {
		ds := len(dst)
		dst = append(dst, data...)
		dst = append(dst, zeroPad[:pad4(len(data))]...)
		if dataDigest {
			dst = binary.LittleEndian.AppendUint32(dst, crc32c(0, dst[ds:]))
		}
	}
	return dst
}

func TestAppendIOVMatchesTheTestEncoder(t *testing.T) {
	for _, n := range []int{0, 1, 4, 5, 8192} {
		for _, dig := range [][2]bool{{false, false}, {true, false}, {true, true}} {
			var p outPDU
			h := p.bhs()
			h[0] = opDataIn
			h.setU32(offITT, 42)
			p.data = pattern(n, byte(n))
			h.setDataLen(n)
			var got []byte
			for _, b := range appendIOV(nil, &p, dig[0], dig[1]) {
				got = append(got, b...)
			}
			if want := appendPDU(nil, h, nil, p.data, dig[0], dig[1]); !bytes.Equal(got, want) {
				t.Fatalf("%d bytes, digests %v: wire form differs", n, dig)
			}
		}
	}
}
