//go:build linux

package e2e

// The hostile-tenant suite (issue 9): one tenant attacks the target with the raw client from
// inside its own network; after each attack the other tenant still gets full service, the
// accounting shows that the attacker holds nothing once its connections are gone, and the
// process is back near its baseline of descriptors and memory. Every wait is for an event,
// bounded by patience; every attack is bounded in work, never in time.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Configurations of the cases. Cases that hold buffers let the attacker use the whole server
// budget as its own limit, so only the fair share protects the victim; cases that touch
// memory cap the attacker at 16 MiB so the RSS bound means something under the race detector;
// cases that end by idleness use short NOP timers.
var (
	greedyConf = hostileConf{limits: `buffer = "2GiB"`, nopInterval: "1s", nopTimeout: "10s"}
	idleConf   = hostileConf{limits: `buffer = "16MiB"`, nopInterval: "500ms", nopTimeout: "2s"}
)

// hostileLogins opens n sessions of the hostile tenant, each with its own ISID.
func (e *hostileEnv) hostileLogins(n int) []*rawConn {
	e.t.Helper()
	ncs, err := dialIn(e.hostile.ini, "10.0.0.1:3260", n)
	if err != nil {
		e.t.Fatal(err)
	}
	var rcs []*rawConn
	for i, nc := range ncs {
		rc := newRawConn(nc)
		e.t.Cleanup(func() { rc.nc.Close() })
		if err := rc.login(loginOpts{initiator: hostileIni, target: hostileIQN, isid: hostileISID(i)}); err != nil {
			e.t.Fatalf("hostile login %d: %v", i, err)
		}
		rcs = append(rcs, rc)
	}
	return rcs
}

func hostileISID(i int) [6]byte { return [6]byte{0x80, 0, 0, 0, byte(i >> 8), byte(i)} }

// withholdWrites sends n WRITE(16)s of size bytes each, no data, and waits until the target
// has answered each one: with an R2T (it now holds a buffer for it) or with a refusal (TASK SET
// FULL or BUSY). It never sends the data.
func withholdWrites(rc *rawConn, n, size int) (asked, refused int, err error) {
	pending := map[uint32]bool{}
	slots := hostileLUNSz / size
	for i := 0; i < n; i++ {
		lba := uint64(i%slots) * uint64(size/512)
		itt, err := rc.sendCmd(scsiCmd{cdb: cdbRW16(opWrite16, lba, uint32(size/512)), edtl: uint32(size), write: true})
		if err != nil {
			return asked, refused, fmt.Errorf("send WRITE %d: %w", i, err)
		}
		pending[itt] = true
	}
	for len(pending) > 0 {
		p, err := rc.read()
		if err != nil {
			return asked, refused, fmt.Errorf("wait for R2T: %w", err)
		}
		switch {
		case p.op() == rawOpReject:
			return asked, refused, fmt.Errorf("target rejected a WRITE: reason 0x%02x", p.hdr[2])
		case !pending[p.itt()]:
			continue
		case p.op() == rawOpR2T:
			asked++
		case p.op() == rawOpSCSIResp && (p.hdr[3] == scsiTaskSetFull || p.hdr[3] == 0x08):
			refused++
		default:
			return asked, refused, fmt.Errorf("unexpected answer to a WRITE: %v status 0x%02x", p, p.hdr[3])
		}
		delete(pending, p.itt())
	}
	return asked, refused, nil
}

// (a) Issue 9: about 32 abandoned 64 MiB WRITEs (R2T outstanding, then a TCP reset) left every
// tenant with TASK SET FULL on any data command until restart.
func TestHostileAbandonedWritesGiveBackTheirBuffers(t *testing.T) {
	e := newHostileEnv(t, greedyConf)
	asked, refused := 0, 0
	rcs := e.hostileLogins(8)
	for _, rc := range rcs {
		a, r, err := withholdWrites(rc, 4, 64<<20)
		if err != nil {
			t.Fatal(err)
		}
		asked, refused = asked+a, refused+r
	}
	for _, rc := range rcs {
		rc.reset()
	}
	t.Logf("the target asked for the data of %d of 32 WRITEs of 64 MiB and refused %d; all 8 connections reset", asked, refused)
	e.checkRefusalsLogged(refused)
	e.aftermath()
}

// (b) Issue 9: reinstating a session (same InitiatorName and ISID) while its WRITEs wait for
// Data-Out leaked the same way; it is open-iscsi's ordinary recovery path.
func TestHostileReinstatementWithPendingWritesGivesBackTheirBuffers(t *testing.T) {
	e := newHostileEnv(t, greedyConf)
	isid := hostileISID(7)
	var last *rawConn
	asked, refused := 0, 0
	// 9 sessions: the first 8 are reinstated with 4 x 64 MiB pending each (2 GiB, the whole
	// server budget), the last logs out.
	for round := 0; round < 9; round++ {
		rc, err := dialRaw(e.hostile.ini)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rc.nc.Close() })
		if err := rc.login(loginOpts{initiator: hostileIni, target: hostileIQN, isid: isid}); err != nil {
			t.Fatalf("round %d: reinstating login: %v", round, err)
		}
		a, r, err := withholdWrites(rc, 4, 64<<20)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		asked, refused = asked+a, refused+r
		last = rc
	}
	t.Logf("over 9 sessions with one ISID the target asked for the data of %d of 36 WRITEs of 64 MiB and refused %d", asked, refused)
	if err := last.logout(); err != nil {
		t.Fatalf("logout of the last session: %v", err)
	}
	e.aftermath()
}

// (c) Issue 9: immediate NOP-Outs with 256 KiB of ping data from a client that never reads grew
// the server by 2 GB in 3.4 s. Echoes must be bounded (the peer gets back-pressure) and a peer
// that does not read is closed after a write stall.
func TestHostileUnreadNopEchoesStayBoundedAndTheConnectionIsClosed(t *testing.T) {
	const (
		ping     = 256 << 10
		maxPings = 16 << 10 // 4 GiB of ping data bounds the attack if nothing else does
		rssBound = 256 << 20
	)
	e := newHostileEnv(t, idleConf)
	rc := e.hostileLogins(1)[0]
	var sent atomic.Int64
	done := make(chan error, 1)
	go func() { done <- floodNops(rc, ping, maxPings, &sent) }()

	base := e.base.Process.RSSBytes
	var werr error
	waitFor(t, "the server to close the connection that does not read", func() error {
		rss, err := e.rssNow()
		if err != nil {
			return err
		}
		if grew := rss - base; grew > rssBound {
			rc.reset()
			<-done
			t.Fatalf("server RSS grew by %d MiB (bound %d MiB) after %d MiB of unread NOP echoes",
				grew>>20, rssBound>>20, sent.Load()>>20)
		}
		select {
		case werr = <-done:
			return nil
		default:
			return fmt.Errorf("still sending: %d MiB so far, RSS +%d MiB", sent.Load()>>20, (rss-base)>>20)
		}
	})
	if !isClosed(werr) {
		t.Fatalf("after %d MiB of pings whose echoes were never read the connection is not closed by the target: %v", sent.Load()>>20, werr)
	}
	t.Logf("connection closed by the server after %d MiB of ping data (%v)", sent.Load()>>20, werr)
	e.aftermath()
}

// floodNops sends immediate NOP-Outs that ask for an echo of size bytes, never reading, until a
// write fails (the target closed the connection) or max pings are sent.
func floodNops(rc *rawConn, size, max int, sent *atomic.Int64) error {
	p := &rawPDU{}
	p.hdr[0] = rawOpNopOut | rawImmediate
	p.hdr[1] = rawFinal
	p.put32(20, rawReservedTag)
	p.put32(24, rc.cmdSN)
	p.data = bytes.Repeat([]byte{0xab}, size)
	wire := p.encode()
	for i := 1; i <= max; i++ {
		copy(wire[16:20], []byte{byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)})
		if err := rc.write(wire); err != nil {
			return err
		}
		sent.Add(int64(size))
	}
	return nil
}

// holder keeps a hostile session alive (answering NOP-In pings) and records when it ends.
type holder struct {
	rc     *rawConn
	closed atomic.Bool
	err    error
	done   chan struct{}
}

func hold(rc *rawConn) *holder {
	h := &holder{rc: rc, done: make(chan struct{})}
	go func() {
		defer close(h.done)
		for {
			if _, err := rc.read(); err != nil {
				h.err = err
				h.closed.Store(true)
				return
			}
		}
	}()
	return h
}

// (d) Issue 9: 8 connections of one tenant holding 16 x 16 MiB WRITEs each (Data-Out withheld,
// NOP-Ins answered) made another tenant's INQUIRY fail with TASK SET FULL.
func TestHostileWithheldWritesDoNotStarveAnotherTenant(t *testing.T) {
	e := newHostileEnv(t, greedyConf)
	var holders []*holder
	asked, refused := 0, 0
	for _, rc := range e.hostileLogins(8) {
		a, r, err := withholdWrites(rc, 16, 16<<20)
		if err != nil {
			t.Fatal(err)
		}
		asked, refused = asked+a, refused+r
		holders = append(holders, hold(rc))
	}
	t.Logf("the hostile tenant holds the buffers of %d of 128 WRITEs of 16 MiB (%d refused)", asked, refused)
	e.checkRefusalsLogged(refused)
	if err := e.victimRaw(); err != nil {
		t.Errorf("victim while the hostile tenant holds its WRITEs: %v", err)
	}
	for i, h := range holders {
		if h.closed.Load() {
			t.Errorf("hostile connection %d ended before the victim's check was over (%v): the case proved nothing", i, h.err)
		}
	}
	for _, h := range holders {
		h.rc.reset()
		<-h.done
	}
	e.aftermath()
}

// (e) Issue 9: one tenant opening ~20,000 connections used up the process's descriptors and the
// other tenants could no longer log in. Here serve gets 1024 descriptors and the hostile tenant
// a limit of 64 connections, and opens 2,000.
func TestHostileConnectionFloodIsCappedAndAnotherTenantStillLogsIn(t *testing.T) {
	const limit, flood = 64, 2000
	e := newHostileEnv(t, hostileConf{limits: fmt.Sprintf("connections = %d", limit), nopInterval: "1s", nopTimeout: "10s", nofile: 1024})
	ncs, err := dialIn(e.hostile.ini, "10.0.0.1:3260", flood)
	for _, nc := range ncs {
		t.Cleanup(func() { nc.SetLinger(0); nc.Close() })
	}
	if err != nil {
		t.Fatal(err)
	}
	results := make(chan *holder, flood)
	for i, nc := range ncs {
		go func() {
			rc := newRawConn(nc)
			if err := rc.login(loginOpts{initiator: hostileIni, isid: hostileISID(i)}); err != nil {
				h := &holder{rc: rc, err: err, done: make(chan struct{})}
				h.closed.Store(true)
				close(h.done)
				results <- h
				return
			}
			results <- hold(rc)
		}()
	}
	in, refused := e.collectFlood(results, flood, limit)
	t.Logf("of %d connections %d logged in and %d were refused", flood, len(in), refused)
	if len(in) == 0 {
		t.Fatalf("no connection of the hostile tenant logged in: its limit of %d refused everything", limit)
	}
	if err := e.victimRaw(); err != nil {
		t.Errorf("victim while the hostile tenant floods: %v", err)
	}
	e.victimQemu()
	u, err := e.usage()
	if err != nil {
		t.Fatal(err)
	}
	if c := u.Tenants["hostile"].Connections; c > limit {
		t.Errorf("/debug/usage: the hostile tenant holds %d connections, its limit is %d", c, limit)
	}
	e.checkRefusalsLogged(flood - len(in))
	for _, h := range in {
		h.rc.reset()
		<-h.done
	}
	e.aftermath()
}

// collectFlood gathers the login outcome of every flood connection; it fails at once when the
// hostile tenant gets more than limit logged in or the server runs out of descriptors.
func (e *hostileEnv) collectFlood(results <-chan *holder, flood, limit int) (in []*holder, refused int) {
	e.t.Helper()
	emfile := func(l logLine) bool { return strings.Contains(l.str("err"), "too many open files") }
	take := func(h *holder) {
		if h.closed.Load() {
			refused++
		} else {
			in = append(in, h)
		}
	}
	waitFor(e.t, "every flood connection to be logged in or refused", func() error {
		for drained := false; !drained; {
			select {
			case h := <-results:
				take(h)
			default:
				drained = true
			}
		}
		if len(in) > limit {
			e.t.Fatalf("%d connections of the hostile tenant logged in, its limit is %d", len(in), limit)
		}
		if n := e.srv.count(emfile); n > 0 {
			e.t.Fatalf("the server ran out of descriptors (%d 'too many open files' log lines) with %d hostile connections logged in", n, len(in))
		}
		if got := len(in) + refused; got < flood {
			return fmt.Errorf("%d of %d resolved", got, flood)
		}
		return nil
	})
	return in, refused
}

// checkRefusalsLogged wants refusals of the hostile tenant visible: logged with the tenant and
// a reason, and rate-limited (from 100 refusals on, at most one line per 10).
func (e *hostileEnv) checkRefusalsLogged(refusals int) {
	e.t.Helper()
	if refusals == 0 {
		return
	}
	refusal := func(l logLine) bool { return l.str("tenant") == "hostile" && l.str("reason") != "" }
	// The line may follow the refusal the client saw: wait for it.
	e.srv.waitLog(e.t, fmt.Sprintf("a log line with tenant=hostile and a reason for %d refusals", refusals), refusal)
	if n := e.srv.count(refusal); refusals >= 100 && n > refusals/10 {
		e.t.Errorf("%d log lines with tenant=hostile and a reason for %d refusals: not rate-limited", n, refusals)
	}
}

// A connection that sends a PDU header and then stalls half-way is idle: it is closed after
// nop_interval + nop_timeout, and what it announced is not held.
func TestHostileMidPDUStallIsClosedAsIdle(t *testing.T) {
	e := newHostileEnv(t, idleConf)
	rcs := e.hostileLogins(2)
	// A WRITE announcing 64 KiB of immediate data, of which 1000 bytes arrive.
	_, err := rcs[0].sendCmd(scsiCmd{cdb: cdbRW16(opWrite16, 0, 128), edtl: 64 << 10, write: true,
		imm: make([]byte, 1000), dataLen: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	// Half a header.
	if err := rcs[1].write(make([]byte, 20)); err != nil {
		t.Fatal(err)
	}
	for i, rc := range rcs {
		if err := waitClosedByTarget(rc); err != nil {
			t.Errorf("stalled connection %d: %v", i, err)
		}
	}
	e.aftermath()
}

// waitClosedByTarget reads and discards until the target closes the connection. It never
// writes, not even an answer to a ping: bytes from us would be progress (or the rest of a
// stalled PDU). A read that waits longer than patience is an error.
func waitClosedByTarget(rc *rawConn) error {
	for {
		rc.nc.SetReadDeadline(time.Now().Add(patience))
		_, err := readRawPDU(rc.r, rawMaxDataLen)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("not closed by the target within %v", patience)
		}
		if isClosed(err) {
			return nil
		}
		return fmt.Errorf("read: %w", err)
	}
}

// A data segment longer than the MaxRecvDataSegmentLength the target declared (256 KiB) is a
// protocol error: the connection is closed, whatever PDU announces it, and nothing is held.
func TestHostileDataSegmentBeyondMaxRecvDataSegmentLengthIsRefused(t *testing.T) {
	e := newHostileEnv(t, idleConf)
	rcs := e.hostileLogins(3)
	headers := []func(rc *rawConn) error{
		func(rc *rawConn) error {
			_, err := rc.sendCmd(scsiCmd{cdb: cdbRW16(opWrite16, 0, 32768), edtl: 16 << 20, write: true, dataLen: rawMaxDataLen})
			return err
		},
		func(rc *rawConn) error { return rc.write(lyingHeader(rawOpNopOut|rawImmediate, 1)) },
		func(rc *rawConn) error { return rc.write(lyingHeader(rawOpDataOut, 2)) },
	}
	var wg sync.WaitGroup
	for i, rc := range rcs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := headers[i](rc); err != nil {
				t.Errorf("connection %d: send header: %v", i, err)
				return
			}
			// Send what the header announced until the target stops us; it may read or not.
			chunk := make([]byte, 64<<10)
			for sent := 0; sent < rawMaxDataLen; sent += len(chunk) {
				if rc.write(chunk[:min(len(chunk), rawMaxDataLen-sent)]) != nil {
					break
				}
			}
			if err := waitClosedByTarget(rc); err != nil {
				t.Errorf("connection %d with an oversized data segment: %v", i, err)
			}
		}()
	}
	wg.Wait()
	e.aftermath()
}

// lyingHeader is a BHS of opcode op announcing the largest data segment a header can carry.
func lyingHeader(op byte, itt uint32) []byte {
	p := &rawPDU{}
	p.hdr[0] = op
	p.hdr[1] = rawFinal
	p.put32(16, itt)
	p.put32(20, rawReservedTag)
	p.setDataLen(rawMaxDataLen)
	return p.hdr[:]
}

// Data-Out for tasks that do not exist (never sent, or long finished) is dropped or ends the
// connection, but never desynchronizes it or holds anything.
func TestHostileDataOutForUnknownTasksHoldsNothing(t *testing.T) {
	e := newHostileEnv(t, idleConf)
	rc := e.hostileLogins(1)[0]
	if err := rc.inquiry(); err != nil {
		t.Fatalf("hostile INQUIRY: %v", err)
	}
	finished := rc.nextITT // the INQUIRY's task, over by now
	rng := rand.New(rand.NewPCG(9, 9))
	data := make([]byte, 64<<10)
	for i := 0; i < 256; i++ {
		itt, ttt := rng.Uint32(), rng.Uint32()
		if i%2 == 0 {
			itt = finished
		}
		if err := rc.sendDataOut(itt, ttt, 0, uint32(i)*uint32(len(data)), data, true); err != nil {
			t.Logf("the target closed the connection after %d stray Data-Outs: %v", i, err)
			break
		}
	}
	probe := []byte("still in step?")
	itt, err := rc.sendNop(probe)
	if err == nil {
		err = expectEcho(rc, itt, probe)
	}
	switch {
	case err == nil:
		t.Log("stray Data-Outs were dropped; the connection is still in step")
		if err := rc.logout(); err != nil {
			t.Errorf("logout after stray Data-Outs: %v", err)
		}
	case isClosed(err):
		t.Logf("the target closed the connection over stray Data-Outs: %v", err)
	default:
		t.Errorf("after stray Data-Outs: %v", err)
	}
	e.aftermath()
}

// expectEcho waits for the NOP-In answering itt and checks it carries data; Rejects of the
// stray PDUs before it are fine.
func expectEcho(rc *rawConn, itt uint32, data []byte) error {
	for {
		p, err := rc.read()
		if err != nil {
			return err
		}
		if p.op() == rawOpReject {
			continue
		}
		if p.op() != rawOpNopIn || p.itt() != itt {
			return fmt.Errorf("want the NOP-In echo, got %v: the connection is out of step", p)
		}
		if !bytes.Equal(p.data, data) {
			return fmt.Errorf("NOP-In echo carries %q, want %q: the connection is out of step", p.data, data)
		}
		return nil
	}
}

func isClosed(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// Random bytes, before login or after it, end only the connection that sends them.
func TestHostileGarbageBytesEndOnlyThatConnection(t *testing.T) {
	e := newHostileEnv(t, idleConf)
	pre, err := dialRaw(e.hostile.ini)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pre.nc.Close() })
	post := e.hostileLogins(1)[0]
	rng := rand.New(rand.NewPCG(1, 2)) // seeded: a failure replays
	var wg sync.WaitGroup
	for i, rc := range []*rawConn{pre, post} {
		garbage := make([]byte, 1<<20)
		for j := range garbage {
			garbage[j] = byte(rng.Uint32())
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc.write(garbage) // may fail half-way: the target is free to hang up
			if err := waitClosedByTarget(rc); err != nil {
				t.Errorf("garbage connection %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	e.aftermath()
}
