//go:build linux

package main

// A small pipelined iSCSI initiator (RFC 7143) for load: login (AuthMethod=None, no digests,
// ERL 0), SendTargets discovery, and READ(16)/WRITE(16) with many commands in flight on one
// connection, each timed from send to status. It follows the shape of tests/e2e/rawiscsi_test.go
// (which is test code and not importable) and is independent of the target's own encoder.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	opNopOut    = 0x00
	opSCSICmd   = 0x01
	opLogin     = 0x03
	opText      = 0x04
	opDataOut   = 0x05
	opLogout    = 0x06
	opNopIn     = 0x20
	opSCSIResp  = 0x21
	opLoginResp = 0x23
	opTextResp  = 0x24
	opDataIn    = 0x25
	opLogoutRsp = 0x26
	opR2T       = 0x31
	opAsync     = 0x32
	opReject    = 0x3f

	flImmediate  = 0x40
	flFinal      = 0x80
	flRead       = 0x40
	flWrite      = 0x20
	flSimple     = 0x01
	flStatus     = 0x01
	reservedTag  = 0xffffffff
	ourMRDSL     = 256 << 10
	ioDeadline   = 30 * time.Second
	read16Opcode = 0x88
	wrt16Opcode  = 0x8a
)

// errConnLost is any failure of the connection while commands were in flight.
var errConnLost = errors.New("connection lost")

type hdr [48]byte

func (h *hdr) op() byte              { return h[0] & 0x3f }
func (h *hdr) u32(o int) uint32      { return binary.BigEndian.Uint32(h[o:]) }
func (h *hdr) put32(o int, v uint32) { binary.BigEndian.PutUint32(h[o:], v) }
func (h *hdr) dlen() int             { return int(h[5])<<16 | int(h[6])<<8 | int(h[7]) }
func (h *hdr) setDlen(n int)         { h[5], h[6], h[7] = byte(n>>16), byte(n>>8), byte(n) }

// sess is one logged-in connection (one session).
type sess struct {
	nc *net.TCPConn
	r  *bufio.Reader

	wmu       sync.Mutex // serialises writes and the sequence numbers below
	cmdSN     uint32
	maxCmdSN  uint32
	expStatSN uint32
	nextITT   uint32
	winCond   *sync.Cond

	targetMRDSL uint32
	firstBurst  uint32
	immediate   bool

	pmu     sync.Mutex
	pending map[uint32]*pend
	err     error // first connection failure; set once
	asyncs  int   // Async Messages received (e.g. logout requests)
	wbuf    []byte
}

type pend struct {
	done chan error
	out  []byte // data of a write, for R2Ts
}

func newSess(nc *net.TCPConn) *sess {
	s := &sess{nc: nc, r: bufio.NewReaderSize(nc, 64<<10), cmdSN: 1, maxCmdSN: 1, nextITT: 1, targetMRDSL: 8192, pending: map[uint32]*pend{}}
	s.winCond = sync.NewCond(&s.wmu)
	return s
}

func (s *sess) close() { s.nc.Close() }

// failed returns the connection's failure, if any.
func (s *sess) failed() error {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	return s.err
}

// sendLocked writes header h (CmdSN/ExpStatSN filled in) and data; s.wmu is held.
func (s *sess) sendLocked(h *hdr, data []byte, takesCmdSN bool) error {
	if h.op() != opDataOut {
		h.put32(24, s.cmdSN)
		if takesCmdSN && h[0]&flImmediate == 0 {
			s.cmdSN++
		}
	}
	h.put32(28, s.expStatSN)
	h.setDlen(len(data))
	pad := (4 - len(data)%4) % 4
	b := s.wbuf[:0]
	b = append(b, h[:]...)
	b = append(b, data...)
	for i := 0; i < pad; i++ {
		b = append(b, 0)
	}
	s.wbuf = b
	s.nc.SetWriteDeadline(time.Now().Add(ioDeadline))
	_, err := s.nc.Write(b)
	return err
}

func (s *sess) send(h *hdr, data []byte, takesCmdSN bool) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return s.sendLocked(h, data, takesCmdSN)
}

func (s *sess) itt() uint32 {
	s.nextITT++
	if s.nextITT == reservedTag {
		s.nextITT = 1
	}
	return s.nextITT
}

// readPDU reads one PDU; the data segment goes into buf if it fits (grown otherwise).
func (s *sess) readPDU(h *hdr, buf []byte) ([]byte, error) {
	s.nc.SetReadDeadline(time.Now().Add(ioDeadline))
	if _, err := io.ReadFull(s.r, h[:]); err != nil {
		return buf, err
	}
	if ahs := int(h[4]) * 4; ahs > 0 {
		if _, err := s.r.Discard(ahs); err != nil {
			return buf, err
		}
	}
	n := h.dlen()
	if n > ourMRDSL {
		return buf, fmt.Errorf("data segment %d over our MaxRecvDataSegmentLength", n)
	}
	tot := n + (4-n%4)%4
	if cap(buf) < tot {
		buf = make([]byte, tot)
	}
	buf = buf[:tot]
	if _, err := io.ReadFull(s.r, buf); err != nil {
		return buf, err
	}
	return buf[:n], nil
}

// noteSN takes StatSN and the command window from a response.
func (s *sess) noteSN(h *hdr) {
	switch h.op() {
	case opSCSIResp, opLoginResp, opTextResp, opLogoutRsp, opReject, opAsync, opNopIn, opDataIn, opR2T:
	default:
		return
	}
	s.wmu.Lock()
	consumes := true
	switch h.op() {
	case opNopIn:
		consumes = h.u32(16) != reservedTag
	case opDataIn:
		consumes = h[1]&flStatus != 0
	case opR2T:
		consumes = false
	}
	if consumes {
		if sn := h.u32(24) + 1; int32(sn-s.expStatSN) > 0 {
			s.expStatSN = sn
		}
	}
	if h.op() != opLoginResp {
		if m := h.u32(32); int32(m-s.maxCmdSN) > 0 {
			// Wake one waiting sender per new slot, not all of them: a target that shares
			// its window out one slot at a time would otherwise cost this client a wake-up
			// of every waiting sender per command.
			for range min(m-s.maxCmdSN, 256) {
				s.winCond.Signal()
			}
			s.maxCmdSN = m
		}
	}
	s.wmu.Unlock()
}

// ---- login and discovery (synchronous, before the reader runs) ----

func (s *sess) loginStep(isid [6]byte, itt uint32, csg, nsg byte, keys []string) (map[string]string, error) {
	var h hdr
	h[0] = opLogin | flImmediate
	h[1] = 0x80 | csg<<2 | nsg
	copy(h[8:14], isid[:])
	h.put32(16, itt)
	if err := s.send(&h, []byte(strings.Join(keys, "\x00")+"\x00"), false); err != nil {
		return nil, err
	}
	var r hdr
	data, err := s.readPDU(&r, nil)
	if err != nil {
		return nil, err
	}
	s.noteSN(&r)
	if r.op() != opLoginResp {
		return nil, fmt.Errorf("want login response, got opcode 0x%02x", r.op())
	}
	if st := uint16(r[36])<<8 | uint16(r[37]); st != 0 {
		return nil, fmt.Errorf("login refused: status 0x%04x", st)
	}
	if r[1]&0x80 == 0 || r[1]&3 != nsg {
		return nil, fmt.Errorf("target did not move to stage %d", nsg)
	}
	s.wmu.Lock()
	s.maxCmdSN = r.u32(32)
	s.cmdSN = r.u32(28)
	s.wmu.Unlock()
	kv := map[string]string{}
	for _, f := range strings.Split(string(data), "\x00") {
		if k, v, ok := strings.Cut(f, "="); ok {
			kv[k] = v
		}
	}
	return kv, nil
}

// login logs in; target "" is a discovery session.
func (s *sess) login(initiator, target string, isid [6]byte) error {
	keys := []string{"InitiatorName=" + initiator, "AuthMethod=None"}
	if target == "" {
		keys = append(keys, "SessionType=Discovery")
	} else {
		keys = append(keys, "SessionType=Normal", "TargetName="+target)
	}
	s.wmu.Lock()
	itt := s.itt()
	s.wmu.Unlock()
	if _, err := s.loginStep(isid, itt, 0, 1, keys); err != nil {
		return fmt.Errorf("security stage: %w", err)
	}
	keys = []string{"HeaderDigest=None", "DataDigest=None", "MaxRecvDataSegmentLength=" + strconv.Itoa(ourMRDSL)}
	if target != "" {
		keys = append(keys, "ErrorRecoveryLevel=0", "InitialR2T=Yes", "ImmediateData=Yes",
			"MaxBurstLength=1048576", "FirstBurstLength=262144", "MaxOutstandingR2T=1",
			"MaxConnections=1", "DataPDUInOrder=Yes", "DataSequenceInOrder=Yes",
			"DefaultTime2Wait=0", "DefaultTime2Retain=0")
	}
	kv, err := s.loginStep(isid, itt, 1, 3, keys)
	if err != nil {
		return fmt.Errorf("operational stage: %w", err)
	}
	num := func(k string, def uint32) uint32 {
		if n, err := strconv.ParseUint(kv[k], 10, 32); err == nil {
			return uint32(n)
		}
		return def
	}
	s.targetMRDSL = num("MaxRecvDataSegmentLength", 8192)
	s.firstBurst = num("FirstBurstLength", 65536)
	s.immediate = kv["ImmediateData"] != "No"
	return nil
}

// immediateRequest is the header of an immediate, final request of op with a fresh ITT.
func (s *sess) immediateRequest(op byte) hdr {
	var h hdr
	h[0] = op | flImmediate
	h[1] = flFinal
	s.wmu.Lock()
	h.put32(16, s.itt())
	s.wmu.Unlock()
	return h
}

// sendLogout sends a Logout Request that closes the session.
func (s *sess) sendLogout() error {
	h := s.immediateRequest(opLogout)
	return s.send(&h, nil, true)
}

// sendTargets runs Text SendTargets=All on a discovery session and returns the answer.
func (s *sess) sendTargets() (string, error) {
	h := s.immediateRequest(opText)
	h.put32(20, reservedTag)
	if err := s.send(&h, []byte("SendTargets=All\x00"), true); err != nil {
		return "", err
	}
	var all []byte
	for {
		var r hdr
		data, err := s.readPDU(&r, nil)
		if err != nil {
			return "", err
		}
		s.noteSN(&r)
		if r.op() != opTextResp {
			continue
		}
		all = append(all, data...)
		if r[1]&flFinal != 0 {
			return string(all), nil
		}
		// Continue: an empty Text Request with the target's TTT.
		var c hdr
		c[0] = opText | flImmediate
		c[1] = flFinal
		c.put32(16, r.u32(16))
		c.put32(20, r.u32(20))
		if err := s.send(&c, nil, true); err != nil {
			return "", err
		}
	}
}

// logoutSync logs out a session that has no reader running.
func (s *sess) logoutSync() error {
	if err := s.sendLogout(); err != nil {
		return err
	}
	for {
		var r hdr
		if _, err := s.readPDU(&r, nil); err != nil {
			return err
		}
		if r.op() == opLogoutRsp {
			return nil
		}
	}
}

// ---- pipelined SCSI ----

// reader runs until the connection fails or closes, completing pending commands.
func (s *sess) reader() {
	buf := make([]byte, ourMRDSL+4)
	var h hdr
	for {
		data, err := s.readPDU(&h, buf)
		if err != nil {
			s.fail(fmt.Errorf("%w: %v", errConnLost, err))
			return
		}
		s.noteSN(&h)
		switch h.op() {
		case opNopIn:
			if h.u32(16) == reservedTag { // a ping: answer it
				var p hdr
				p[0] = opNopOut | flImmediate
				p[1] = flFinal
				copy(p[8:16], h[8:16])
				p.put32(16, reservedTag)
				p.put32(20, h.u32(20))
				if err := s.send(&p, nil, false); err != nil {
					s.fail(fmt.Errorf("%w: answer ping: %v", errConnLost, err))
					return
				}
			}
		case opDataIn:
			if h[1]&flStatus != 0 {
				var e error
				if h[3] != 0 {
					e = fmt.Errorf("SCSI status 0x%02x", h[3])
				}
				s.complete(h.u32(16), e)
			}
		case opSCSIResp:
			var e error
			if h[2] != 0 || h[3] != 0 {
				e = fmt.Errorf("SCSI response 0x%02x status 0x%02x", h[2], h[3])
			}
			s.complete(h.u32(16), e)
		case opR2T:
			s.pmu.Lock()
			p := s.pending[h.u32(16)]
			s.pmu.Unlock()
			if p == nil {
				continue
			}
			if err := s.answerR2T(&h, p.out); err != nil {
				s.fail(fmt.Errorf("%w: data-out: %v", errConnLost, err))
				return
			}
		case opAsync:
			s.pmu.Lock()
			s.asyncs++
			s.pmu.Unlock()
		case opLogoutRsp:
			s.fail(fmt.Errorf("%w: logged out", errConnLost))
			return
		case opReject:
			s.fail(fmt.Errorf("target rejected a PDU: reason 0x%02x", h[2]))
			return
		}
		_ = data
	}
}

func (s *sess) answerR2T(h *hdr, out []byte) error {
	off, length := h.u32(40), h.u32(44)
	if uint64(off)+uint64(length) > uint64(len(out)) {
		return fmt.Errorf("R2T beyond the command's data")
	}
	var sn uint32
	for done := uint32(0); done < length; sn++ {
		n := min(length-done, s.targetMRDSL)
		var d hdr
		d[0] = opDataOut
		if done+n == length {
			d[1] = flFinal
		}
		d.put32(16, h.u32(16))
		d.put32(20, h.u32(20))
		d.put32(36, sn)
		d.put32(40, off+done)
		if err := s.send(&d, out[off+done:off+done+n], false); err != nil {
			return err
		}
		done += n
	}
	return nil
}

func (s *sess) complete(itt uint32, err error) {
	s.pmu.Lock()
	p := s.pending[itt]
	delete(s.pending, itt)
	s.pmu.Unlock()
	if p != nil {
		p.done <- err
	}
}

func (s *sess) fail(err error) {
	s.pmu.Lock()
	if s.err == nil {
		s.err = err
	}
	ps := s.pending
	s.pending = map[uint32]*pend{}
	s.pmu.Unlock()
	for _, p := range ps {
		p.done <- err
	}
	s.wmu.Lock()
	s.winCond.Broadcast()
	s.wmu.Unlock()
}

// rw sends one READ(16) or WRITE(16) and waits for its status. done is reused by the caller.
func (s *sess) rw(write bool, lba uint64, blocks uint32, blockSize uint32, out []byte, p *pend) error {
	var h hdr
	h[0] = opSCSICmd
	h[1] = flFinal | flSimple
	edtl := blocks * blockSize
	cdb := h[32:48]
	if write {
		h[1] |= flWrite
		cdb[0] = wrt16Opcode
	} else {
		h[1] |= flRead
		cdb[0] = read16Opcode
	}
	binary.BigEndian.PutUint64(cdb[2:], lba)
	binary.BigEndian.PutUint32(cdb[10:], blocks)
	h.put32(20, edtl)
	var imm []byte
	if write && s.immediate {
		// InitialR2T=Yes: whatever does not fit comes by R2T (reader answers them).
		imm = out[:min(len(out), int(s.firstBurst), int(s.targetMRDSL))]
	}
	p.out = out
	s.wmu.Lock()
	for int32(s.cmdSN-s.maxCmdSN) > 0 {
		s.pmu.Lock()
		e := s.err
		s.pmu.Unlock()
		if e != nil {
			s.wmu.Unlock()
			return e
		}
		s.winCond.Wait()
	}
	itt := s.itt()
	h.put32(16, itt)
	s.pmu.Lock()
	if s.err != nil {
		e := s.err
		s.pmu.Unlock()
		s.wmu.Unlock()
		return e
	}
	s.pending[itt] = p
	s.pmu.Unlock()
	err := s.sendLocked(&h, imm, true)
	s.wmu.Unlock()
	if err != nil {
		s.fail(fmt.Errorf("%w: send: %v", errConnLost, err))
	}
	return <-p.done
}

// readCapacity16 returns (blocks, block size) of LUN 0 on a session with no reader running.
func (s *sess) readCapacity16() (uint64, uint32, error) {
	var h hdr
	h[0] = opSCSICmd
	h[1] = flFinal | flSimple | flRead
	h.put32(20, 32)
	cdb := h[32:48]
	cdb[0] = 0x9e
	cdb[1] = 0x10
	binary.BigEndian.PutUint32(cdb[10:], 32)
	s.wmu.Lock()
	itt := s.itt()
	s.wmu.Unlock()
	h.put32(16, itt)
	if err := s.send(&h, nil, true); err != nil {
		return 0, 0, err
	}
	var in []byte
	for {
		var r hdr
		data, err := s.readPDU(&r, nil)
		if err != nil {
			return 0, 0, err
		}
		s.noteSN(&r)
		switch r.op() {
		case opDataIn:
			in = append(in, data...)
			if r[1]&flStatus == 0 {
				continue
			}
			if r[3] != 0 {
				return 0, 0, fmt.Errorf("READ CAPACITY status 0x%02x", r[3])
			}
		case opSCSIResp:
			if r[3] != 0 {
				return 0, 0, fmt.Errorf("READ CAPACITY status 0x%02x", r[3])
			}
		default:
			continue
		}
		if len(in) < 12 {
			return 0, 0, fmt.Errorf("short READ CAPACITY answer")
		}
		return binary.BigEndian.Uint64(in) + 1, binary.BigEndian.Uint32(in[8:]), nil
	}
}
