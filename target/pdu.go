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
	rejectOutOfResources = 0x0a // "long op reject": cannot generate a TTT, out of resources
)

// Logout reasons and responses (§11.14, §11.15).
const (
	logoutCloseSession         = 0
	logoutCloseConnection      = 1
	logoutRemoveForRecovery    = 2
	logoutCIDNotFound          = 1
	logoutRecoveryNotSupported = 2
)

// asyncLogoutRequest is the Async Message event "target requests logout" (§11.9.1).
const asyncLogoutRequest = 1

// The one target portal group of every tenant portal: login, SendTargets and the nexus all
// say the same.
const (
	tpgt       = 1
	tpgtString = "1"
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
	// SCSI Response / Data-In byte 1
	flagResidualOverflow  = 0x04
	flagResidualUnderflow = 0x02
	flagStatus            = 0x01 // Data-In S bit: status is in this PDU
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

// Field offsets (§11). Several PDU types put different fields at the same offset.
const (
	offResponse    = 2  // SCSI Response, TMF Response, Logout Response
	offReason      = 2  // Reject
	offVersionMax  = 2  // Login Request
	offVersionMin  = 3  // Login Request
	offStatus      = 3  // SCSI Response, Data-In with S
	offLUN         = 8  // 8 bytes
	offISID        = 8  // login: 6 bytes
	offTSIH        = 14 // login: 2 bytes
	offITT         = 16
	offTTT         = 20
	offEDTL        = 20 // SCSI Command
	offCID         = 20 // Login and Logout Request: 2 bytes
	offCmdSN       = 24 // initiator PDUs
	offStatSN      = 24 // target PDUs
	offRTT         = 20 // TMF Request: referenced task tag
	offExpStatSN   = 28 // initiator PDUs
	offExpCmdSN    = 28 // target PDUs
	offMaxCmdSN    = 32
	offDataSN      = 36 // Data-In/-Out; R2TSN of an R2T; ExpDataSN of a SCSI Response
	offExpDataSN   = 36
	offAsyncEvent  = 36 // Async Message: 1 byte
	offLoginStatus = 36 // Login Response: class, detail
	offBufOffset   = 40
	offTime2Wait   = 40 // Logout Response: 2 bytes
	offTime2Retain = 42 // Logout Response: 2 bytes
	offAsyncParam3 = 42 // Async Message: 2 bytes
	offResidual    = 44
	offDesiredLen  = 44 // R2T: desired data transfer length
)

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

// frame is one parsed PDU, used off the hot path (login, fuzzing, tests).
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

// parsePDU parses one PDU from b (for fuzzing and tests): it returns the frame and how many
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

// appendIOV appends the wire form of p (header, header digest, data, padding, data digest)
// to iov, computing the digests in p's own slots: the one PDU encoder of the target. Callers
// must have set the header's data length.
func appendIOV(iov [][]byte, p *outPDU, headerDigest, dataDigest bool) [][]byte {
	n := bhsLen
	if headerDigest {
		binary.LittleEndian.PutUint32(p.hdr[bhsLen:], crc32c(0, p.hdr[:bhsLen]))
		n += 4
	}
	iov = append(iov, p.hdr[:n])
	if len(p.data) > 0 {
		iov = append(iov, p.data)
		pad := zeroPad[:pad4(len(p.data))]
		if len(pad) > 0 {
			iov = append(iov, pad)
		}
		if dataDigest {
			binary.LittleEndian.PutUint32(p.ddig[:], crc32c(crc32c(0, p.data), pad))
			iov = append(iov, p.ddig[:])
		}
	}
	return iov
}

var zeroPad [4]byte
