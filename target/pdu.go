package target

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Opcodes (RFC 7143 §11.2.1.2).
const (
	opNopOut     = 0x00
	opSCSICmd    = 0x01
	opTMFReq     = 0x02
	opLoginReq   = 0x03
	opTextReq    = 0x04
	opDataOut    = 0x05
	opLogoutReq  = 0x06
	opSNACK      = 0x10
	opNopIn      = 0x20
	opSCSIResp   = 0x21
	opTMFResp    = 0x22
	opLoginResp  = 0x23
	opTextResp   = 0x24
	opDataIn     = 0x25
	opLogoutResp = 0x26
	opR2T        = 0x31
	opAsync      = 0x32
	opReject     = 0x3f
)

// Reject reasons (§11.17.1).
const (
	rejectDataDigest     = 0x02
	rejectProtocol       = 0x04
	rejectNotSupported   = 0x05
	rejectImmediate      = 0x06
	rejectTaskInProgress = 0x07
	rejectInvalidField   = 0x09
	rejectWaitingLogout  = 0x0c
)

const (
	bhsLen        = 48
	reservedTag   = 0xffffffff
	maxAHSBytes   = 255 * 4
	maxCDBLen     = 16 + 255*4 // whole CDB incl. extended-CDB AHS
	flagFinal     = 0x80
	flagRead      = 0x40
	flagWrite     = 0x20
	flagContinue  = 0x40 // login/text C bit
	flagTransit   = 0x80 // login T bit
	flagImmediate = 0x40 // byte 0
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc32c(crc uint32, b []byte) uint32 { return crc32.Update(crc, castagnoli, b) }

// bhs is a raw Basic Header Segment; accessors read fields in place so the hot path neither
// decodes nor allocates.
type bhs [bhsLen]byte

func (h *bhs) opcode() byte    { return h[0] & 0x3f }
func (h *bhs) immediate() bool { return h[0]&flagImmediate != 0 }
func (h *bhs) flags() byte     { return h[1] }
func (h *bhs) ahsLen() int     { return int(h[4]) * 4 }
func (h *bhs) dataLen() int    { return int(h[5])<<16 | int(h[6])<<8 | int(h[7]) }
func (h *bhs) lunRaw() uint64  { return binary.BigEndian.Uint64(h[8:16]) }
func (h *bhs) itt() uint32     { return binary.BigEndian.Uint32(h[16:20]) }
func (h *bhs) u32(off int) uint32 {
	return binary.BigEndian.Uint32(h[off : off+4])
}
func (h *bhs) setU32(off int, v uint32) { binary.BigEndian.PutUint32(h[off:off+4], v) }
func (h *bhs) setDataLen(n int) {
	h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n)
}

// Field offsets shared by several PDU types.
const (
	offITT       = 16
	offTTT       = 20 // also EDTL of a SCSI command, RTT of a TMF
	offCmdSN     = 24 // StatSN in target PDUs
	offExpStatSN = 28 // ExpCmdSN in target PDUs
	offMaxCmdSN  = 32
	offDataSN    = 36
	offBufOffset = 40
	offResidual  = 44
)

// decodeLUN turns the 8-byte LUN field into a flat LUN number (SAM-5 peripheral and flat
// addressing; other methods are passed through as the raw first level).
func decodeLUN(raw uint64) uint64 {
	first := uint16(raw >> 48)
	switch first >> 14 {
	case 0: // peripheral device addressing, bus 0
		return uint64(first & 0xff)
	case 1: // flat space
		return uint64(first & 0x3fff)
	}
	return raw
}

// encodeLUN is the inverse for the LUN numbers we hand out.
func encodeLUN(lun uint64) uint64 {
	if lun < 256 {
		return lun << 48
	}
	if lun < 0x4000 {
		return (0x4000 | lun) << 48
	}
	return lun
}

func pad4(n int) int { return (4 - n&3) & 3 }

// errDigest marks a digest mismatch; the connection decides what it costs.
var errDigest = errors.New("digest mismatch")

// pduReader reads PDUs in two steps so the caller can pick where the data segment lands
// (straight into a task's buffer for Data-Out and immediate data).
type pduReader struct {
	r            io.Reader
	headerDigest bool
	dataDigest   bool
	ahs          [maxAHSBytes]byte
	scratch      [8]byte
}

// readHeader reads BHS, AHS and header digest into h; it returns the AHS bytes (valid until the
// next call).
func (pr *pduReader) readHeader(h *bhs) ([]byte, error) {
	if _, err := io.ReadFull(pr.r, h[:]); err != nil {
		return nil, err
	}
	n := h.ahsLen()
	ahs := pr.ahs[:n]
	if n > 0 {
		if _, err := io.ReadFull(pr.r, ahs); err != nil {
			return nil, fmt.Errorf("read AHS: %w", err)
		}
	}
	if pr.headerDigest {
		if _, err := io.ReadFull(pr.r, pr.scratch[:4]); err != nil {
			return nil, fmt.Errorf("read header digest: %w", err)
		}
		crc := crc32c(crc32c(0, h[:]), ahs)
		if binary.LittleEndian.Uint32(pr.scratch[:4]) != crc {
			return nil, fmt.Errorf("header: %w", errDigest)
		}
	}
	return ahs, nil
}

// readData reads a data segment of len(dst) bytes into dst, then padding and data digest.
// A digest mismatch returns errDigest after the whole segment was consumed.
func (pr *pduReader) readData(dst []byte) error {
	if len(dst) == 0 {
		return nil
	}
	if _, err := io.ReadFull(pr.r, dst); err != nil {
		return fmt.Errorf("read data segment: %w", err)
	}
	p := pad4(len(dst))
	extra := p
	if pr.dataDigest {
		extra += 4
	}
	if extra > 0 {
		if _, err := io.ReadFull(pr.r, pr.scratch[:extra]); err != nil {
			return fmt.Errorf("read data padding: %w", err)
		}
	}
	if pr.dataDigest {
		crc := crc32c(crc32c(0, dst), pr.scratch[:p])
		if binary.LittleEndian.Uint32(pr.scratch[p:p+4]) != crc {
			return fmt.Errorf("data: %w", errDigest)
		}
	}
	return nil
}

// discard skips a data segment of n bytes (plus padding and digest) we have no use for.
func (pr *pduReader) discard(n int) error {
	if n == 0 {
		return nil
	}
	n += pad4(n)
	if pr.dataDigest {
		n += 4
	}
	_, err := io.CopyN(io.Discard, pr.r, int64(n))
	return err
}

// cdbFromPDU assembles the whole CDB of a SCSI command: 16 bytes from the BHS plus an
// Extended CDB AHS when present. dst must hold maxCDBLen bytes.
func cdbFromPDU(h *bhs, ahs []byte, dst []byte) ([]byte, error) {
	cdb := append(dst[:0], h[32:48]...)
	for len(ahs) > 0 {
		if len(ahs) < 4 {
			return nil, errors.New("truncated AHS")
		}
		l := int(binary.BigEndian.Uint16(ahs[0:2]))
		typ := ahs[2]
		total := 3 + l
		total += pad4(total)
		if total > len(ahs) || l < 1 {
			return nil, errors.New("AHS length beyond header")
		}
		if typ == 1 { // extended CDB: one reserved byte then CDB bytes 16..
			cdb = append(cdb, ahs[4:3+l]...)
		}
		ahs = ahs[total:]
	}
	return cdb, nil
}

// Frame is one parsed PDU, used off the hot path (login, fuzzing, tests).
type frame struct {
	BHS  bhs
	AHS  []byte
	Data []byte
}

// maxLoginData bounds the data segment accepted before full feature phase.
const maxLoginData = 64 * 1024

// readFrame reads a complete PDU with its data segment (at most limit bytes).
func (pr *pduReader) readFrame(limit int) (*frame, error) {
	f := &frame{}
	ahs, err := pr.readHeader(&f.BHS)
	if err != nil {
		return nil, err
	}
	f.AHS = append([]byte(nil), ahs...)
	n := f.BHS.dataLen()
	if n > limit {
		return nil, fmt.Errorf("data segment of %d bytes exceeds limit %d", n, limit)
	}
	f.Data = make([]byte, n)
	if err := pr.readData(f.Data); err != nil {
		return nil, err
	}
	return f, nil
}

// ParsePDU parses one PDU from b (for fuzzing and tests): it returns the frame and how many
// bytes it used.
func parsePDU(b []byte, headerDigest, dataDigest bool) (*frame, int, error) {
	r := &countReader{b: b}
	pr := &pduReader{r: r, headerDigest: headerDigest, dataDigest: dataDigest}
	f, err := pr.readFrame(len(b))
	if err != nil {
		return nil, r.n, err
	}
	if f.BHS.opcode() == opSCSICmd {
		var buf [maxCDBLen]byte
		if _, err := cdbFromPDU(&f.BHS, f.AHS, buf[:]); err != nil {
			return nil, r.n, err
		}
	}
	return f, r.n, nil
}

type countReader struct {
	b []byte
	n int
}

func (r *countReader) Read(p []byte) (int, error) {
	if r.n >= len(r.b) {
		return 0, io.EOF
	}
	k := copy(p, r.b[r.n:])
	r.n += k
	return k, nil
}

// AppendPDU encodes h (with AHS and data) the way the writer does; used by tests and by the
// login phase. ahs must be a multiple of 4 bytes.
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

var zeroPad [4]byte
