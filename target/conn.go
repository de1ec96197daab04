package target

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"nstarget/target/chap"
	"nstarget/target/scsi"
)

// conn is the I/O edge of one TCP connection: it reads PDUs, steps the session core with
// them, writes what the core queues and runs the commands it hands out.
//
// Goroutines: the ServeConn caller runs login, then the reader loop (it also runs fast SCSI
// commands inline and flushes the write queue itself before it blocks); writeLoop drains the
// write queue when kicked; the tick timer (time.AfterFunc, no goroutine while waiting) steps
// the core's clock; while the backend is slow each SCSI command runs in its own goroutine
// (counted in execs). Every step of the core happens under mu; every write to nc under wlock.
// kill (closing nc) stops them all; serve waits for every one before it returns.
type conn struct {
	since  time.Time // accepted
	srv    *Server
	nc     net.Conn
	tenant *Tenant
	log    *slog.Logger
	br     *bufio.Reader
	pr     pduReader
	sess   *session
	params params

	killOnce sync.Once
	stop     chan struct{} // closed by kill
	done     chan struct{} // closed when serve returns
	loggedIn atomic.Bool

	mu      sync.Mutex // guards core and ticking
	core    *core
	tk      *time.Timer
	ticking bool

	// Mirrors of the core's send queue for the lock-free checks of the hot path.
	pending      atomic.Int32 // PDUs queued and not yet taken by a flush
	pendingBytes atomic.Int64 // their data bytes
	readerBusy   atomic.Bool  // the reader is handling a PDU and flushes before it blocks
	endAfter     atomic.Bool  // close once the queue is written

	wsig  chan struct{} // kicks the writer
	space chan struct{} // kicked when output drained or time passed: input may resume
	wdone chan struct{} // closed when writeLoop returns

	writerStarted bool // set by serve before it starts writeLoop

	sock io.Reader   // nc, or a reader that spins on it briefly before parking (spinread_linux.go)
	sw   *sockWriter // raw writev on nc (sockwrite_linux.go); nil: net.Buffers.WriteTo

	wlock sync.Mutex // held by whoever writes to nc; guards the fields below
	nb    net.Buffers
	iov   [][]byte
	spare []*outPDU

	// Counters of this connection, folded into its tenant's and target's when it ends (so
	// connections of one tenant do not share cache lines per command); under mu.
	lat    latencyCounts
	folded bool

	execs      sync.WaitGroup
	lastExecNs atomic.Int64 // duration of the latest Execute: picks inline vs goroutine
	run        []*task      // reader-owned scratch for run actions
	fairCount  fairCounter  // commands and cost not yet reported to fair.go
	paceTimer  *time.Timer  // reader-owned, made at the first pace
}

func newConn(s *Server, nc net.Conn, t *Tenant, attrs []slog.Attr) *conn {
	args := make([]any, 0, len(attrs)+2)
	args = append(args, slog.String("tenant", t.Name), slog.String("remote", nc.RemoteAddr().String()))
	for _, a := range attrs {
		args = append(args, a)
	}
	c := &conn{
		since:  time.Now(),
		srv:    s,
		nc:     nc,
		tenant: t,
		log:    s.log.With(args...),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
		wsig:   make(chan struct{}, 1),
		space:  make(chan struct{}, 1),
		wdone:  make(chan struct{}),
	}
	c.sock = newSocketReader(nc, &c.pending, &t.fair.sessWindow)
	c.sw = newSockWriter(nc)
	c.br = bufio.NewReaderSize(c.sock, 64<<10)
	c.pr.r = c.br
	return c
}

// kill closes the socket, which ends the reader and the writer; safe from any goroutine.
func (c *conn) kill() {
	c.killOnce.Do(func() {
		close(c.stop)
		c.nc.Close()
	})
}

func (c *conn) serve(ctx context.Context) (err error) {
	defer close(c.done)
	stopCtx := context.AfterFunc(ctx, c.kill)
	defer stopCtx()
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("panic in connection; closing it", "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("target: panic: %v", r)
		}
		c.finish()
		c.log.Debug("connection ended", "err", err)
	}()
	if err := c.login(); err != nil {
		if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
			return nil
		}
		c.tenant.stats.loginsFailed.Add(1)
		if !errors.Is(err, errAuthFailed) {
			c.log.Info("login failed", "err", err)
		}
		return err
	}
	c.logLogin()
	c.tenant.stats.loginsOK.Add(1)
	c.writerStarted = true
	go c.writeLoop()
	c.startTicking()
	err = c.readLoop()
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return nil
	}
	if c.sess.discovery && errors.Is(err, syscall.ECONNRESET) {
		// iscsiadm ends SendTargets discovery with a reset instead of a Logout: normal.
		c.log.Debug("discovery connection reset by the initiator")
		return nil
	}
	select {
	case <-c.stop:
		return nil
	default:
	}
	c.log.Info("connection closed", "err", err)
	return err
}

// finish stops everything the connection started and gives back everything it held, in the
// order that makes that safe: no more input or output, then close the core, then let running
// commands complete into the closed core.
func (c *conn) finish() {
	c.kill()
	if c.core == nil {
		c.releaseHoldings()
		return
	}
	if c.writerStarted {
		<-c.wdone
	}
	c.mu.Lock()
	c.ticking = false
	if c.tk != nil {
		c.tk.Stop()
	}
	c.core.close()
	logs := c.collectLocked()
	c.mu.Unlock()
	c.carryOut(logs)
	c.execs.Wait()
	c.mu.Lock()
	c.foldCountersLocked()
	clean := c.core.heldNothing()
	held := c.core.held
	c.mu.Unlock()
	if !clean {
		// A bug, not a tenant's doing: say exactly what leaked.
		c.log.Error("connection ended holding resources", "commands", held[resCommands], "bytes", held[resBytes])
	}
	c.releaseHoldings()
}

// releaseHoldings gives back what the connection held outside its core: its session (with
// the nexus's SPC-2 reservations) and its connection unit.
func (c *conn) releaseHoldings() {
	// Last of all, and before done is closed: whoever waits for this connection to end
	// (CloseTenant, reinstatement) then finds everything it held given back.
	defer c.srv.ledger.give(&c.tenant.acct, resConns, 1)
	if ss := c.sess; ss != nil && !ss.discovery {
		c.srv.release(ss)
		ss.tg.dev.NexusLoss(&ss.nexus)
	}
}

// --- login ---

type connLoginEnv struct{ c *conn }

func (e connLoginEnv) findTarget(name, initiator string) (*Target, uint16) {
	tg := e.c.tenant.find(name)
	if tg == nil {
		return nil, loginNotFound
	}
	if !tg.allows(initiator) {
		return nil, loginAuthorizationFail
	}
	return tg, 0
}

func (e connLoginEnv) complete(ls *loginState) (uint16, uint16) {
	c := e.c
	ss := &session{discovery: ls.discovery, tg: ls.target, conn: c, cid: ls.cid}
	c.params = ls.params
	// Discovery sessions need the initiator name too: SendTargets honours allow-lists.
	ss.key = sessionKey{tg: ls.target, initiator: ls.initiatorName, isid: ls.isid}
	if ls.discovery {
		c.sess = ss
		return 1, 0 // discovery sessions are not registered; any non-zero TSIH will do
	}
	ss.nexus = scsi.Nexus{
		ID:              c.srv.nextNexus.Add(1),
		InitiatorName:   ls.initiatorName,
		ISID:            ls.isid,
		TargetName:      ls.target.cfg.IQN,
		RelTargetPortID: 1,
		TPGT:            tpgt,
	}
	tsih, st := c.srv.admit(ss)
	if st == 0 {
		c.sess = ss
		ls.target.dev.Attach(&ss.nexus)
	}
	return tsih, st
}

func (e connLoginEnv) discoveryCHAP() *chap.Credentials { return e.c.tenant.discoveryCredentials() }

func (e connLoginEnv) challenge(n int) (byte, []byte) {
	var id [1]byte
	c := make([]byte, n)
	for {
		rand.Read(id[:])
		rand.Read(c)
		if e.c.srv.challenges.add(c) {
			return id[0], c
		}
	}
}

func (e connLoginEnv) issued(c []byte) bool { return e.c.srv.challenges.has(c) }

// errAuthFailed marks a login refused for failed authentication, already logged.
var errAuthFailed = errors.New("authentication failed")

const loginTimeout = 30 * time.Second

func (c *conn) login() error {
	ls := newLoginState(connLoginEnv{c}, c.srv.policy, uint32(c.srv.opts.QueueDepth))
	c.nc.SetDeadline(time.Now().Add(loginTimeout))
	defer c.nc.SetDeadline(time.Time{})
	for !ls.done {
		f, err := c.pr.readFrame(maxLoginData)
		if err != nil {
			return fmt.Errorf("read login request: %w", err)
		}
		resp, data, fail := ls.step(f)
		if fail && ls.authFail != nil {
			if err := c.refuseAuth(ls); err != nil {
				return err
			}
		}
		if ls.done {
			// The core exists before the final response is written: from here on Shutdown
			// queues its logout request behind that response instead of cutting the
			// connection.
			c.startCore(ls)
			if sp, ok := c.sock.(interface{ enableSpin() }); ok && !ls.discovery {
				sp.enableSpin()
			}
		}
		var p outPDU
		*p.bhs() = resp
		p.bhs().setDataLen(len(data))
		p.data = data
		nb := net.Buffers(appendIOV(nil, &p, false, false))
		if _, err := nb.WriteTo(c.nc); err != nil {
			return fmt.Errorf("write login response: %w", err)
		}
		if fail && ls.authFail != nil {
			return errAuthFailed
		}
		if fail {
			return fmt.Errorf("login refused with status 0x%04x (initiator %q target %q)",
				binary.BigEndian.Uint16(resp[offLoginStatus:]), ls.initiatorName, ls.targetName)
		}
	}
	c.pr.headerDigest = c.params.HeaderDigest
	c.pr.dataDigest = c.params.DataDigest
	kind := "normal"
	if c.sess.discovery {
		kind = "discovery"
	}
	c.log = c.log.With("initiator", ls.initiatorName, "tsih", c.sess.tsih)
	auth := "none"
	if ls.creds != nil {
		auth = "CHAP " + ls.chapAlg.String()
	}
	c.log.Debug("login complete", "session", kind, "target", ls.targetName, "auth", auth,
		"mrdsl_in", c.params.TargetRecvDSL, "mrdsl_out", c.params.InitiatorRecvDSL,
		"burst", c.params.MaxBurstLength, "first_burst", c.params.FirstBurstLength,
		"immediate", c.params.ImmediateData, "initial_r2t", c.params.InitialR2T,
		"hd", c.params.HeaderDigest, "dd", c.params.DataDigest)
	return nil
}

// refuseAuth logs a failed authentication (never a secret: the state machine has none in its
// reasons) and waits the constant delay before the refusal goes out; the wait ends early
// only when the connection is being closed.
func (c *conn) refuseAuth(ls *loginState) error {
	kind := "normal"
	if ls.discovery {
		kind = "discovery"
	}
	attrs := []any{"initiator", ls.initiatorName, "session", kind, "reason", ls.authFail.reason}
	if ls.targetName != "" {
		attrs = append(attrs, "target", ls.targetName)
	}
	if ls.authFail.algorithm != 0 {
		attrs = append(attrs, "algorithm", ls.authFail.algorithm.String())
	}
	c.log.Info("authentication failed", attrs...)
	t := time.NewTimer(c.srv.opts.AuthFailDelay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-c.stop:
		return net.ErrClosed
	}
}

// startCore makes the session core of a completed login.
func (c *conn) startCore(ls *loginState) {
	o := &c.srv.opts
	cr := newCore(coreConfig{
		p:          c.params,
		sess:       c.sess,
		tenant:     c.tenant,
		led:        c.srv.ledger,
		bufs:       &c.srv.bufs,
		portal:     portalAddr(c.nc.LocalAddr()),
		depth:      uint32(o.QueueDepth),
		statSN:     ls.statSN,
		expCmdSN:   ls.expCmdSN,
		connBytes:  connBufBudget,
		nopEvery:   1,
		nopTimeout: ticksIn(o.NopTimeout, o.NopInterval),
		stallTicks: ticksIn(o.NopTimeout, o.NopInterval),
	})
	c.mu.Lock()
	c.core = cr
	c.mu.Unlock()
	c.loggedIn.Store(true)
}

// connBufBudget bounds data buffers held by one connection's commands.
const connBufBudget = 256 << 20

// ticksIn converts d into whole ticks of length tick, at least one.
func ticksIn(d, tick time.Duration) int { return max(1, int((d+tick-1)/tick)) }

func portalAddr(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok {
		ip := ta.IP
		if ip4 := ip.To4(); ip4 != nil {
			return ip4.String() + ":" + strconv.Itoa(ta.Port)
		}
		return "[" + ip.String() + "]:" + strconv.Itoa(ta.Port)
	}
	return a.String()
}

// --- stepping the core ---

// collectLocked takes the actions of the last steps out of the core: it returns the logs for
// carryOut, applies the end mode and mirrors the send queue. Only input events hand out
// commands, and the reader takes those with collectRunLocked. Caller holds mu.
func (c *conn) collectLocked() []logRecord {
	a := c.core.ready()
	var logs []logRecord
	if len(a.logs) > 0 {
		logs = append(logs, a.logs...)
	}
	if len(a.run) > 0 {
		panic("target: the core handed out commands outside an input event")
	}
	switch a.end {
	case endNow:
		defer c.kill()
	case endAfterSend:
		c.endAfter.Store(true)
	}
	a.end = endNone
	c.pending.Store(int32(len(a.send)))
	c.pendingBytes.Store(c.core.queuedBytes())
	c.core.advance()
	return logs
}

// collectRunLocked is collectLocked for the reader, which also takes the commands to run.
func (c *conn) collectRunLocked() []logRecord {
	a := c.core.ready()
	c.run = append(c.run[:0], a.run...)
	clear(a.run)
	a.run = a.run[:0]
	return c.collectLocked()
}

// carryOut logs what the core asked to log, rate-limiting refusals per tenant and reason.
func (c *conn) carryOut(logs []logRecord) {
	for _, r := range logs {
		if r.limited != "" {
			c.srv.refused(c.log, c.tenant, r.level, r.limited, r.msg, r.attrs...)
			continue
		}
		c.log.Log(context.Background(), r.level, r.msg, r.attrs...)
	}
	if c.endAfter.Load() {
		c.kick()
	}
}

// --- reader ---

func (c *conn) readLoop() error {
	var h bhs
	// A connection whose initiator keeps it full never waits for input, and runs its
	// commands inline: without a turn given up now and then, every other connection would
	// wait for the scheduler to preempt it. A turn is fairQuantum PDUs per tenant, shared by
	// the tenant's connections that are busy at the same time, so a tenant's share of turns
	// does not grow with the connections it opens.
	burst := 0    // PDUs handled since the reader last waited for input
	busy := false // counted in the tenant's busy readers
	defer func() {
		if busy {
			c.tenant.busyReaders.Add(-1)
		}
	}()
	for {
		if c.br.Buffered() < bhsLen {
			// About to block for input: write what this goroutine produced first.
			c.readerBusy.Store(false)
			c.readerFlush()
			burst = 0
			if busy {
				busy = false
				c.tenant.busyReaders.Add(-1)
			}
		} else {
			if !busy {
				busy = true
				c.tenant.busyReaders.Add(1)
			}
			if burst++; burst >= max(1, fairQuantum/int(c.tenant.busyReaders.Load())) {
				burst = 0
				runtime.Gosched()
			}
		}
		ahs, err := c.pr.readHeader(&h)
		if err != nil {
			c.readerBusy.Store(false)
			return fmt.Errorf("read PDU header: %w", err)
		}
		if h.opcode() == opSCSICmd {
			if d := c.srv.fair.note(c.tenant, &c.fairCount); d > 0 {
				if err := c.pace(d); err != nil {
					return err
				}
			}
		}
		c.readerBusy.Store(true)
		var l landing
		for {
			c.mu.Lock()
			l = c.core.header(&h, ahs)
			logs := c.collectRunLocked()
			c.mu.Unlock()
			c.carryOut(logs)
			c.runAll()
			if !l.wait {
				break
			}
			// Back-pressure: the peer is not reading what we owe it (or its tenant is at
			// its limit). Stop reading until output drains; the core's clock closes the
			// connection if that never happens.
			c.readerBusy.Store(false)
			c.readerFlush()
			select {
			case <-c.space:
			case <-c.stop:
				return net.ErrClosed
			}
			c.readerBusy.Store(true)
		}
		digestOK := true
		switch {
		case l.buf != nil:
			if err := c.pr.readData(l.buf); errors.Is(err, errDigest) {
				digestOK = false
			} else if err != nil {
				return err
			}
		case l.skip > 0:
			if err := c.pr.discard(l.skip); err != nil {
				return err
			}
		}
		c.mu.Lock()
		c.core.data(digestOK)
		logs := c.collectRunLocked()
		c.mu.Unlock()
		c.carryOut(logs)
		c.runAll()
		if c.pending.Load() >= 32 || c.pendingBytes.Load() > readerFlushLimit {
			c.readerFlush()
		}
	}
}

// pace holds the command just read for d, its tenant's pace (fair.go), with this
// connection's output written first.
func (c *conn) pace(d time.Duration) error {
	c.readerBusy.Store(false)
	c.readerFlush()
	if c.paceTimer == nil {
		c.paceTimer = time.NewTimer(d)
	} else {
		c.paceTimer.Reset(d)
	}
	select {
	case <-c.paceTimer.C:
		return nil
	case <-c.stop:
		c.paceTimer.Stop()
		return net.ErrClosed
	}
}

// --- execution ---

const (
	inlineThresholdNs = 150_000
	inlineMaxBytes    = 256 << 10
	// fairQuantum is how many PDUs a tenant's busy readers handle per turn before they let
	// other goroutines run: small enough that a quiet tenant's command waits for a few of a
	// noisy tenant's, not for a 10 ms preemption slice; large enough that the yield costs
	// nothing measurable.
	fairQuantum = 16
)

// runAll executes what the reader's last step handed out.
func (c *conn) runAll() {
	for i, t := range c.run {
		c.run[i] = nil
		c.execs.Add(1)
		if c.lastExecNs.Load() < inlineThresholdNs && t.edtl <= inlineMaxBytes {
			// Recent commands completed fast (page cache): running this one on the reader
			// goroutine saves two goroutine handoffs, which on few cores costs more than the
			// command itself. A slow command flips the connection to one goroutine per
			// command, so a slow backend still sees concurrency.
			c.execute(t)
			continue
		}
		go c.execute(t)
	}
	c.run = c.run[:0]
}

func (c *conn) execute(t *task) {
	defer c.execs.Done()
	res, took := c.runTask(t)
	if t.kind == kindSCSI {
		c.srv.fair.ran(&c.fairCount, took)
	}
	c.mu.Lock()
	if t.kind == kindSCSI {
		c.lat.observe(took)
	}
	c.core.completed(t, res)
	logs := c.collectLocked()
	c.mu.Unlock()
	c.carryOut(logs)
	if !c.readerBusy.Load() {
		c.kick()
	}
}

// runTask does t's device work; a panic in it closes only this connection.
func (c *conn) runTask(t *task) (res scsi.Result, took time.Duration) {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("panic executing SCSI command; closing connection", "panic", r,
				"cdb", fmt.Sprintf("% x", t.cmd.CDB), "stack", string(debug.Stack()))
			c.kill()
			res = scsi.Result{Status: scsi.StatusBusy}
		}
	}()
	dev := c.sess.tg.dev
	switch t.kind {
	case kindLUNReset:
		if err := dev.LUNReset(t.cmd.LUN, t.cmd.Nexus); err != nil {
			res.Status = scsi.StatusCheckCondition
		}
	case kindTargetReset:
		dev.TargetReset(t.cmd.Nexus)
	case kindNexusLoss:
		dev.NexusLoss(t.cmd.Nexus)
	default:
		start := time.Now()
		res = dev.Execute(&t.cmd)
		took = time.Since(start)
		c.lastExecNs.Store(int64(took))
	}
	return res, took
}

// --- clock ---

func (c *conn) startTicking() {
	c.mu.Lock()
	c.ticking = true
	c.tk = time.AfterFunc(c.srv.opts.NopInterval, c.onTick)
	c.mu.Unlock()
}

func (c *conn) onTick() {
	c.mu.Lock()
	if !c.ticking {
		c.mu.Unlock()
		return
	}
	c.core.tick()
	logs := c.collectLocked()
	c.tk.Reset(c.srv.opts.NopInterval)
	c.mu.Unlock()
	c.carryOut(logs)
	c.kick()
	c.signalSpace()
}

func (c *conn) signalSpace() {
	select {
	case c.space <- struct{}{}:
	default:
	}
}

// requestLogout asks the initiator to log out (Async Message), e.g. at shutdown.
func (c *conn) requestLogout() {
	if !c.loggedIn.Load() {
		c.kill()
		return
	}
	c.mu.Lock()
	if c.core == nil {
		c.mu.Unlock()
		c.kill()
		return
	}
	c.core.requestLogout(logoutGraceSeconds)
	logs := c.collectLocked()
	c.mu.Unlock()
	c.carryOut(logs)
	c.kick()
}

// logoutGraceSeconds is what the Async logout request gives the initiator (Parameter3).
const logoutGraceSeconds = 10

// --- writer ---

func (c *conn) kick() {
	select {
	case c.wsig <- struct{}{}:
	default:
	}
}

// readerFlush writes what is queued from the reader goroutine when that is cheap (small and
// the socket is free), which saves waking the writer; otherwise it hands off to the writer.
func (c *conn) readerFlush() {
	if c.pending.Load() == 0 {
		return
	}
	if c.pendingBytes.Load() <= readerFlushLimit && c.wlock.TryLock() {
		err := c.flushLocked()
		c.wlock.Unlock()
		if err != nil {
			c.kill()
			return
		}
		if c.pending.Load() == 0 && !c.endAfter.Load() {
			return
		}
	}
	c.kick()
}

// readerFlushLimit bounds what the reader writes itself: beyond it the writer goroutine takes
// over, so big Data-In drains on one core while the reader executes the next commands.
const readerFlushLimit = 64 << 10

// writeLoop flushes whenever kicked, and closes the connection once an end-after-send is
// due and everything queued is written.
func (c *conn) writeLoop() {
	defer close(c.wdone)
	defer c.recoverAndKill("writer")
	for {
		select {
		case <-c.wsig:
		case <-c.stop:
			return
		}
		c.wlock.Lock()
		err := c.flushLocked()
		c.wlock.Unlock()
		if err != nil {
			c.kill()
			return
		}
		if c.endAfter.Load() && c.pending.Load() == 0 {
			c.kill()
			return
		}
	}
}

// flushLocked writes everything queued, one writev per batch, and reports each batch to the
// core as sent. Caller holds wlock.
func (c *conn) flushLocked() error {
	hd, dd := c.params.HeaderDigest, c.params.DataDigest
	for {
		c.mu.Lock()
		batch := c.core.takeSend(c.spare[:0])
		c.pending.Store(0)
		c.pendingBytes.Store(0)
		c.mu.Unlock()
		if len(batch) == 0 {
			return nil
		}
		iov := c.iov[:0]
		for _, p := range batch {
			iov = appendIOV(iov, p, hd, dd)
		}
		var werr error
		if c.sw != nil {
			werr = c.sw.writeBuffers(iov)
		} else {
			c.nb = iov
			_, werr = c.nb.WriteTo(c.nc)
		}
		clear(iov)
		c.iov = iov[:0]
		c.mu.Lock()
		c.core.sent(batch)
		c.mu.Unlock()
		c.spare = batch[:0]
		c.signalSpace()
		if werr != nil {
			return werr
		}
	}
}

// recoverAndKill turns a panic in one of the connection's goroutines into closing just this
// connection.
func (c *conn) recoverAndKill(who string) {
	if r := recover(); r != nil {
		c.log.Error("panic in connection "+who+"; closing it", "panic", r, "stack", string(debug.Stack()))
		c.kill()
	}
}
