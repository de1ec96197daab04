//go:build linux

package e2e

// A minimal iSCSI initiator (RFC 7143) for the hostile-tenant tests: it sends exactly the PDUs
// a test asks for, including ones no real initiator would send, and decodes what the target
// answers. No digests, ERL 0, one connection per session. It is independent of the target's own
// encoder on purpose: a shared bug would hide itself.

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Opcodes (RFC 7143 §11.2.1.2).
const (
	rawOpNopOut    = 0x00
	rawOpSCSICmd   = 0x01
	rawOpLogin     = 0x03
	rawOpDataOut   = 0x05
	rawOpLogout    = 0x06
	rawOpNopIn     = 0x20
	rawOpSCSIResp  = 0x21
	rawOpTMFResp   = 0x22
	rawOpLoginResp = 0x23
	rawOpTextResp  = 0x24
	rawOpDataIn    = 0x25
	rawOpLogoutRsp = 0x26
	rawOpR2T       = 0x31
	rawOpAsync     = 0x32
	rawOpReject    = 0x3f
)

const (
	rawImmediate   = 0x40 // byte 0 of a request
	rawFinal       = 0x80
	rawRead        = 0x40 // SCSI command flags
	rawWrite       = 0x20
	rawAttrSimple  = 0x01
	rawStatusFlag  = 0x01 // Data-In S bit
	rawReservedTag = 0xffffffff
	rawMaxDataLen  = 1<<24 - 1 // largest data segment a BHS can announce

	scsiGood         = 0x00
	scsiTaskSetFull  = 0x28
	loginOutOfResrcs = 0x0302
)

// rawPDU is one PDU: the 48-byte basic header segment and the data segment (no AHS).
type rawPDU struct {
	hdr  [48]byte
	data []byte
}

func (p *rawPDU) op() byte                { return p.hdr[0] & 0x3f }
func (p *rawPDU) u32(off int) uint32      { return binary.BigEndian.Uint32(p.hdr[off:]) }
func (p *rawPDU) put32(off int, v uint32) { binary.BigEndian.PutUint32(p.hdr[off:], v) }
func (p *rawPDU) itt() uint32             { return p.u32(16) }
func (p *rawPDU) ttt() uint32             { return p.u32(20) }
func (p *rawPDU) dataLen() int            { return int(p.hdr[5])<<16 | int(p.hdr[6])<<8 | int(p.hdr[7]) }

func (p *rawPDU) setDataLen(n int) {
	p.hdr[5], p.hdr[6], p.hdr[7] = byte(n>>16), byte(n>>8), byte(n)
}

// encode returns the PDU as it goes on the wire: header, data, zero padding to 4 bytes.
func (p *rawPDU) encode() []byte {
	p.setDataLen(len(p.data))
	b := make([]byte, 0, 48+len(p.data)+3)
	b = append(b, p.hdr[:]...)
	b = append(b, p.data...)
	return append(b, make([]byte, (4-len(p.data)%4)%4)...)
}

func (p *rawPDU) String() string {
	return fmt.Sprintf("PDU op 0x%02x flags 0x%02x ITT 0x%x TTT 0x%x data %d", p.op(), p.hdr[1], p.itt(), p.ttt(), p.dataLen())
}

// readRawPDU reads one PDU; it refuses a data segment over limit without reading it.
func readRawPDU(r io.Reader, limit int) (*rawPDU, error) {
	p := &rawPDU{}
	if _, err := io.ReadFull(r, p.hdr[:]); err != nil {
		return nil, err
	}
	if ahs := int(p.hdr[4]) * 4; ahs > 0 {
		if _, err := io.CopyN(io.Discard, r, int64(ahs)); err != nil {
			return nil, fmt.Errorf("read AHS: %w", err)
		}
	}
	n := p.dataLen()
	if n > limit {
		return nil, fmt.Errorf("%v: data segment over our MaxRecvDataSegmentLength %d", p, limit)
	}
	buf := make([]byte, n+(4-n%4)%4)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("read data segment of %v: %w", p, err)
	}
	p.data = buf[:n]
	return p, nil
}

// ---- dialling from inside a namespace ----

// dialIn opens n TCP connections to addr from inside the network namespace ns (a name under
// /run/netns, or the absolute path of a namespace file). A socket keeps the namespace it was created in, so only the dials run on a
// thread that entered ns; the thread goes back before it is released, or dies with its
// goroutine if it cannot. It returns the connections made before any error.
func dialIn(ns, addr string, n int) ([]*net.TCPConn, error) {
	type result struct {
		conns []*net.TCPConn
		err   error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var res result
		defer func() { ch <- res }()
		back, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			res.err = fmt.Errorf("open own netns: %w", err)
			runtime.UnlockOSThread()
			return
		}
		defer back.Close()
		path := ns
		if !filepath.IsAbs(ns) {
			path = "/run/netns/" + ns
		}
		f, err := os.Open(path)
		if err != nil {
			res.err = fmt.Errorf("open netns %s: %w", ns, err)
			runtime.UnlockOSThread()
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			res.err = fmt.Errorf("setns %s: %w", ns, err)
			runtime.UnlockOSThread()
			return
		}
		d := net.Dialer{Timeout: patience}
		for i := 0; i < n; i++ {
			c, err := d.Dial("tcp", addr)
			if err != nil {
				res.err = fmt.Errorf("dial %s in %s (connection %d): %w", addr, ns, i, err)
				break
			}
			res.conns = append(res.conns, c.(*net.TCPConn))
		}
		if unix.Setns(int(back.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		} // else: the locked thread exits with this goroutine, never reused in ns
	}()
	res := <-ch
	return res.conns, res.err
}

// ---- the connection ----

// rawConn is one initiator connection. Writes are serialized (a background reader may answer
// pings while the test sends); reads belong to one goroutine at a time.
type rawConn struct {
	nc *net.TCPConn
	r  *bufio.Reader

	wmu       sync.Mutex
	cmdSN     uint32
	expStatSN uint32
	nextITT   uint32

	// From the login: what the target accepts from us.
	targetMRDSL   uint32
	firstBurst    uint32
	immediateData bool
}

// ourMRDSL is the MaxRecvDataSegmentLength we declare: what the target may send us.
const ourMRDSL = 256 << 10

func newRawConn(nc *net.TCPConn) *rawConn {
	return &rawConn{nc: nc, r: bufio.NewReaderSize(nc, 16<<10), cmdSN: 1, nextITT: 1, targetMRDSL: 8192}
}

// dialRaw opens one connection from namespace ns to the tenant portal 10.0.0.1:3260.
func dialRaw(ns string) (*rawConn, error) {
	cs, err := dialIn(ns, "10.0.0.1:3260", 1)
	if err != nil {
		return nil, err
	}
	return newRawConn(cs[0]), nil
}

// reset aborts the connection with a TCP RST (SO_LINGER 0), as a crashed or hostile host would.
func (rc *rawConn) reset() {
	rc.nc.SetLinger(0)
	rc.nc.Close()
}

func (rc *rawConn) itt() uint32 {
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	rc.nextITT++
	if rc.nextITT == rawReservedTag {
		rc.nextITT = 1
	}
	return rc.nextITT
}

// send fills in CmdSN (advancing it for non-immediate requests that take one) and ExpStatSN
// and writes p.
func (rc *rawConn) send(p *rawPDU, takesCmdSN bool) error {
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	if p.op() != rawOpDataOut {
		p.put32(24, rc.cmdSN)
		if takesCmdSN && p.hdr[0]&rawImmediate == 0 {
			rc.cmdSN++
		}
	}
	p.put32(28, rc.expStatSN)
	return rc.write(p.encode())
}

// write writes raw bytes with the safety deadline.
func (rc *rawConn) write(b []byte) error {
	rc.nc.SetWriteDeadline(time.Now().Add(patience))
	_, err := rc.nc.Write(b)
	return err
}

// read returns the next PDU that is not a NOP-In ping; pings are answered on the way, so a
// connection that waits for something stays alive.
func (rc *rawConn) read() (*rawPDU, error) {
	for {
		rc.nc.SetReadDeadline(time.Now().Add(patience))
		p, err := readRawPDU(rc.r, ourMRDSL)
		if err != nil {
			return nil, err
		}
		rc.noteStatSN(p)
		if p.op() == rawOpNopIn && p.itt() == rawReservedTag {
			if err := rc.answerPing(p); err != nil {
				return nil, fmt.Errorf("answer NOP-In: %w", err)
			}
			continue
		}
		return p, nil
	}
}

// noteStatSN advances ExpStatSN past every response that consumed a StatSN.
func (rc *rawConn) noteStatSN(p *rawPDU) {
	switch p.op() {
	case rawOpSCSIResp, rawOpTMFResp, rawOpLoginResp, rawOpTextResp, rawOpLogoutRsp, rawOpReject, rawOpAsync:
	case rawOpNopIn:
		if p.itt() == rawReservedTag {
			return // a ping carries StatSN without consuming it
		}
	case rawOpDataIn:
		if p.hdr[1]&rawStatusFlag == 0 {
			return
		}
	default:
		return
	}
	rc.wmu.Lock()
	if sn := p.u32(24) + 1; int32(sn-rc.expStatSN) > 0 {
		rc.expStatSN = sn
	}
	rc.wmu.Unlock()
}

func (rc *rawConn) answerPing(ping *rawPDU) error {
	p := &rawPDU{}
	p.hdr[0] = rawOpNopOut | rawImmediate
	p.hdr[1] = rawFinal
	copy(p.hdr[8:16], ping.hdr[8:16])
	p.put32(16, rawReservedTag)
	p.put32(20, ping.ttt())
	return rc.send(p, false)
}

// ---- login ----

// loginError is a login the target refused with a status class and detail.
type loginError struct{ status uint16 }

func (e *loginError) Error() string { return fmt.Sprintf("login refused with status 0x%04x", e.status) }

type loginOpts struct {
	initiator string
	target    string // empty: a discovery session
	isid      [6]byte
}

// login runs the security stage (AuthMethod=None) and the operational stage, then enters full
// feature phase.
func (rc *rawConn) login(o loginOpts) error {
	keys := []string{"InitiatorName=" + o.initiator, "AuthMethod=None"}
	if o.target == "" {
		keys = append(keys, "SessionType=Discovery")
	} else {
		keys = append(keys, "SessionType=Normal", "TargetName="+o.target)
	}
	itt := rc.itt()
	if _, err := rc.loginStep(o, itt, 0, 1, keys); err != nil {
		return fmt.Errorf("security stage: %w", err)
	}
	keys = []string{"HeaderDigest=None", "DataDigest=None", "MaxRecvDataSegmentLength=" + strconv.Itoa(ourMRDSL)}
	if o.target != "" {
		keys = append(keys, "ErrorRecoveryLevel=0", "InitialR2T=Yes", "ImmediateData=Yes",
			"MaxBurstLength=1048576", "FirstBurstLength=262144", "MaxOutstandingR2T=1",
			"MaxConnections=1", "DataPDUInOrder=Yes", "DataSequenceInOrder=Yes",
			"DefaultTime2Wait=0", "DefaultTime2Retain=0")
	}
	got, err := rc.loginStep(o, itt, 1, 3, keys)
	if err != nil {
		return fmt.Errorf("operational stage: %w", err)
	}
	return rc.adopt(got)
}

// adopt takes the negotiated values that bound what we send.
func (rc *rawConn) adopt(kv map[string]string) error {
	num := func(k string, def uint32) (uint32, error) {
		v, ok := kv[k]
		if !ok {
			return def, nil
		}
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil {
			return 0, fmt.Errorf("login answer %s=%q: %w", k, v, err)
		}
		return uint32(n), nil
	}
	var err error
	if rc.targetMRDSL, err = num("MaxRecvDataSegmentLength", 8192); err != nil {
		return err
	}
	if rc.firstBurst, err = num("FirstBurstLength", 65536); err != nil {
		return err
	}
	rc.immediateData = kv["ImmediateData"] != "No"
	return nil
}

// loginStep sends one Login Request moving from stage csg to nsg and returns the keys of the
// answer, which must be a successful transit.
func (rc *rawConn) loginStep(o loginOpts, itt uint32, csg, nsg byte, keys []string) (map[string]string, error) {
	p := &rawPDU{}
	p.hdr[0] = rawOpLogin | rawImmediate
	p.hdr[1] = 0x80 | csg<<2 | nsg // T bit
	copy(p.hdr[8:14], o.isid[:])
	p.put32(16, itt)
	p.data = []byte(strings.Join(keys, "\x00") + "\x00")
	if err := rc.send(p, false); err != nil {
		return nil, err
	}
	r, err := rc.read()
	if err != nil {
		return nil, err
	}
	if r.op() != rawOpLoginResp {
		return nil, fmt.Errorf("want a login response, got %v", r)
	}
	if st := uint16(r.hdr[36])<<8 | uint16(r.hdr[37]); st != 0 {
		return nil, &loginError{st}
	}
	if r.hdr[1]&0x80 == 0 || r.hdr[1]&3 != nsg {
		return nil, fmt.Errorf("target did not move to stage %d: flags 0x%02x", nsg, r.hdr[1])
	}
	kv := map[string]string{}
	for _, s := range strings.Split(string(r.data), "\x00") {
		if k, v, ok := strings.Cut(s, "="); ok {
			kv[k] = v
		}
	}
	return kv, nil
}

// logout closes the session cleanly and the connection after it.
func (rc *rawConn) logout() error {
	defer rc.nc.Close()
	p := &rawPDU{}
	p.hdr[0] = rawOpLogout | rawImmediate
	p.hdr[1] = rawFinal // reason 0: close the session
	p.put32(16, rc.itt())
	if err := rc.send(p, true); err != nil {
		return err
	}
	for {
		r, err := rc.read()
		if err != nil {
			return fmt.Errorf("wait for logout response: %w", err)
		}
		if r.op() == rawOpLogoutRsp {
			if r.hdr[2] != 0 {
				return fmt.Errorf("logout response %d", r.hdr[2])
			}
			return nil
		}
	}
}

// ---- SCSI ----

// scsiCmd is one SCSI command PDU to send.
type scsiCmd struct {
	cdb   []byte
	lun   uint64
	edtl  uint32
	read  bool
	write bool
	imm   []byte // immediate data
	// dataLen, if non-zero, is the data segment length announced in the header even if imm
	// is shorter: the rest is left to the caller to send (or not).
	dataLen int
}

// sendCmd sends a SCSI command and returns its ITT.
func (rc *rawConn) sendCmd(c scsiCmd) (uint32, error) {
	p := &rawPDU{}
	p.hdr[0] = rawOpSCSICmd
	p.hdr[1] = rawFinal | rawAttrSimple // InitialR2T=Yes: no unsolicited Data-Out follows
	if c.read {
		p.hdr[1] |= rawRead
	}
	if c.write {
		p.hdr[1] |= rawWrite
	}
	binary.BigEndian.PutUint64(p.hdr[8:16], c.lun<<48)
	itt := rc.itt()
	p.put32(16, itt)
	p.put32(20, c.edtl)
	copy(p.hdr[32:48], c.cdb)
	p.data = c.imm
	if c.dataLen == 0 {
		return itt, rc.send(p, true)
	}
	// A lying header: announce dataLen, send only what imm holds, unpadded.
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	p.put32(24, rc.cmdSN)
	rc.cmdSN++
	p.put32(28, rc.expStatSN)
	p.setDataLen(c.dataLen)
	return itt, rc.write(append(p.hdr[:], c.imm...))
}

// sendDataOut sends one Data-Out PDU.
func (rc *rawConn) sendDataOut(itt, ttt, dataSN, offset uint32, data []byte, final bool) error {
	p := &rawPDU{}
	p.hdr[0] = rawOpDataOut
	if final {
		p.hdr[1] = rawFinal
	}
	p.put32(16, itt)
	p.put32(20, ttt)
	p.put32(36, dataSN)
	p.put32(40, offset)
	p.data = data
	return rc.send(p, false)
}

// sendNop sends an immediate NOP-Out that asks for an echo of data.
func (rc *rawConn) sendNop(data []byte) (uint32, error) {
	p := &rawPDU{}
	p.hdr[0] = rawOpNopOut | rawImmediate
	p.hdr[1] = rawFinal
	itt := rc.itt()
	p.put32(16, itt)
	p.put32(20, rawReservedTag)
	p.data = data
	return itt, rc.send(p, true)
}

// scsiError is a command that ended with a status other than GOOD.
type scsiError struct {
	status byte
	sense  []byte
}

func (e *scsiError) Error() string {
	if e.status == scsiTaskSetFull {
		return "SCSI status TASK SET FULL (0x28)"
	}
	return fmt.Sprintf("SCSI status 0x%02x sense % x", e.status, e.sense)
}

// do runs one command to completion: immediate data as far as the target allows, Data-Out for
// every R2T, Data-In collected. Only one command may be outstanding.
func (rc *rawConn) do(c scsiCmd, out []byte) ([]byte, error) {
	if c.write && rc.immediateData && len(out) > 0 {
		n := min(len(out), int(rc.firstBurst), int(rc.targetMRDSL))
		c.imm = out[:n]
	}
	itt, err := rc.sendCmd(c)
	if err != nil {
		return nil, err
	}
	var in []byte
	for {
		p, err := rc.read()
		if err != nil {
			return nil, err
		}
		if p.itt() != itt {
			if p.op() == rawOpReject {
				return nil, fmt.Errorf("target rejected a PDU: reason 0x%02x", p.hdr[2])
			}
			continue
		}
		switch p.op() {
		case rawOpR2T:
			if err := rc.answerR2T(p, out); err != nil {
				return nil, err
			}
		case rawOpDataIn:
			in = append(in, p.data...)
			if p.hdr[1]&rawStatusFlag != 0 {
				if st := p.hdr[3]; st != scsiGood {
					return nil, &scsiError{status: st}
				}
				return in, nil
			}
		case rawOpSCSIResp:
			if st := p.hdr[3]; st != scsiGood || p.hdr[2] != 0 {
				var sense []byte
				if len(p.data) >= 2 {
					sense = p.data[2:]
				}
				return nil, &scsiError{status: st, sense: sense}
			}
			return in, nil
		default:
			return nil, fmt.Errorf("unexpected %v", p)
		}
	}
}

// answerR2T sends the data an R2T asks for, in PDUs the target accepts.
func (rc *rawConn) answerR2T(r2t *rawPDU, out []byte) error {
	off, length := r2t.u32(40), r2t.u32(44)
	if uint64(off)+uint64(length) > uint64(len(out)) {
		return fmt.Errorf("R2T for %d+%d beyond the %d bytes of the command", off, length, len(out))
	}
	var sn uint32
	for done := uint32(0); done < length; sn++ {
		n := min(length-done, rc.targetMRDSL)
		if err := rc.sendDataOut(r2t.itt(), r2t.ttt(), sn, off+done, out[off+done:off+done+n], done+n == length); err != nil {
			return err
		}
		done += n
	}
	return nil
}

// CDBs (SBC-4, SPC-5).
func cdbInquiry(alloc uint16) []byte {
	return []byte{0x12, 0, 0, byte(alloc >> 8), byte(alloc), 0}
}

func cdbRW16(op byte, lba uint64, blocks uint32) []byte {
	c := make([]byte, 16)
	c[0] = op
	binary.BigEndian.PutUint64(c[2:], lba)
	binary.BigEndian.PutUint32(c[10:], blocks)
	return c
}

const (
	opRead16  = 0x88
	opWrite16 = 0x8a
)

func (rc *rawConn) inquiry() error {
	_, err := rc.do(scsiCmd{cdb: cdbInquiry(96), edtl: 96, read: true}, nil)
	return err
}

func (rc *rawConn) write16(lba uint64, data []byte) error {
	_, err := rc.do(scsiCmd{cdb: cdbRW16(opWrite16, lba, uint32(len(data)/512)), edtl: uint32(len(data)), write: true}, data)
	return err
}

func (rc *rawConn) read16(lba uint64, n int) ([]byte, error) {
	return rc.do(scsiCmd{cdb: cdbRW16(opRead16, lba, uint32(n/512)), edtl: uint32(n), read: true}, nil)
}
