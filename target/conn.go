package target

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"nstarget/target/scsi"
)

// conn is one TCP connection. Goroutines: the ServeConn caller runs login and then the reader
// loop (it owns parsing, Data-Out placement, R2T issue and task management, and runs fast SCSI
// commands inline); writeLoop drains the write queue, which the reader also flushes itself
// before it blocks (every write to nc happens under wlock); pingLoop only queues NOP-Ins; while
// the backend is slow each SCSI command runs in its own goroutine (counted in execs) from its
// last data byte to queueing its response. serve waits for all of them before it returns, and
// kill (closing nc) is what stops them.
type conn struct {
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

	wmu          sync.Mutex // guards wq
	wq           []*outPDU
	pending      atomic.Int32 // PDUs queued and not yet taken by a flush
	pendingBytes atomic.Int64 // their data bytes
	readerBusy   atomic.Bool  // reader is handling a PDU and flushes before it blocks
	wsig         chan struct{}
	wlock        sync.Mutex // held by whoever writes to nc; guards everything below
	statSN       uint32
	nb           net.Buffers
	iov          [][]byte
	spare        []*outPDU
	wdone        chan struct{} // closed when writeLoop returns
	pdone        chan struct{} // closed when pingLoop returns
	loggedIn     atomic.Bool

	tmu     sync.Mutex
	tasks   map[uint32]*task
	execs   sync.WaitGroup
	nextTTT uint32 // reader-owned

	bufBytes    atomic.Int64 // data buffer bytes held by this connection's tasks
	immInflight atomic.Int32 // immediate SCSI commands not yet recycled
	recvSeen    atomic.Bool
	lastExecNs  atomic.Int64 // duration of the latest Execute: picks inline vs goroutine
	pingTTT     uint32

	text textState // reader-owned
	cid  uint16    // connection ID from login
}

type textState struct {
	itt     uint32
	partial []byte // request text received with the C bit
	pending []byte // answer bytes still to send (long SendTargets)
	final   bool   // pending holds a complete answer
	ttt     uint32
}

func newConn(s *Server, nc net.Conn, t *Tenant, attrs []slog.Attr) *conn {
	args := make([]any, 0, len(attrs)+2)
	args = append(args, slog.String("tenant", t.Name), slog.String("remote", nc.RemoteAddr().String()))
	for _, a := range attrs {
		args = append(args, a)
	}
	c := &conn{
		srv:    s,
		nc:     nc,
		tenant: t,
		log:    s.log.With(args...),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
		wsig:   make(chan struct{}, 1),
		wdone:  make(chan struct{}),
		pdone:  make(chan struct{}),
		tasks:  make(map[uint32]*task),
	}
	c.br = bufio.NewReaderSize(newSocketReader(nc, &c.pending), 64<<10)
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

var errLogout = errors.New("logged out")

func (c *conn) serve(ctx context.Context) (err error) {
	defer close(c.done)
	writerStarted := false
	stopCtx := context.AfterFunc(ctx, c.kill)
	defer stopCtx()
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("panic in connection; closing it", "panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("target: panic: %v", r)
		}
		c.kill()
		if writerStarted {
			<-c.wdone
			<-c.pdone
		}
		c.execs.Wait()
		if ss := c.sess; ss != nil && !ss.discovery {
			c.srv.release(ss)
			ss.tg.dev.NexusLoss(&ss.nexus)
		}
		c.log.Debug("connection ended", "err", err)
	}()
	if err := c.login(); err != nil {
		if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) {
			return nil
		}
		c.log.Info("login failed", "err", err)
		return err
	}
	writerStarted = true
	go c.writeLoop()
	go c.pingLoop()
	err = c.readLoop()
	if errors.Is(err, errLogout) || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
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
	ss := &session{discovery: ls.discovery, tg: ls.target, params: ls.params, conn: c}
	ss.win = cmdWindow{expCmdSN: ls.expCmdSN, depth: uint32(c.srv.opts.QueueDepth)}
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
		TPGT:            1,
	}
	tsih, st := c.srv.admit(ss)
	if st == 0 {
		c.sess = ss
	}
	return tsih, st
}

const loginTimeout = 30 * time.Second

func (c *conn) login() error {
	ls := newLoginState(connLoginEnv{c}, c.srv.policy, uint32(c.srv.opts.QueueDepth))
	c.nc.SetDeadline(time.Now().Add(loginTimeout))
	defer c.nc.SetDeadline(time.Time{})
	var out []byte
	for !ls.done {
		f, err := c.pr.readFrame(maxLoginData)
		if err != nil {
			return fmt.Errorf("read login request: %w", err)
		}
		resp, data, fail := ls.step(f)
		if ls.done {
			// From here on Shutdown queues its logout request instead of cutting the
			// connection; the writer sends it after this final login response.
			c.loggedIn.Store(true)
		}
		out = appendPDU(out[:0], &resp, nil, data, false, false)
		if _, err := c.nc.Write(out); err != nil {
			return fmt.Errorf("write login response: %w", err)
		}
		if fail {
			return fmt.Errorf("login refused with status 0x%04x (initiator %q target %q)",
				uint16(resp[36])<<8|uint16(resp[37]), ls.initiatorName, ls.targetName)
		}
	}
	c.statSN = ls.statSN
	c.cid = ls.cid
	c.pr.headerDigest = c.params.HeaderDigest
	c.pr.dataDigest = c.params.DataDigest
	kind := "normal"
	if c.sess.discovery {
		kind = "discovery"
	}
	c.log = c.log.With("initiator", ls.initiatorName, "tsih", c.sess.tsih)
	c.log.Debug("login complete", "session", kind, "target", ls.targetName,
		"mrdsl_in", c.params.TargetRecvDSL, "mrdsl_out", c.params.InitiatorRecvDSL,
		"burst", c.params.MaxBurstLength, "first_burst", c.params.FirstBurstLength,
		"immediate", c.params.ImmediateData, "initial_r2t", c.params.InitialR2T,
		"hd", c.params.HeaderDigest, "dd", c.params.DataDigest)
	return nil
}

// --- writer ---

// statSN modes of an outgoing PDU.
const (
	snNone    = iota // PDU has no StatSN field (Data-In without status)
	snCarry          // carries the next StatSN without consuming it (R2T, NOP-In ping)
	snAdvance        // consumes a StatSN
)

type outPDU struct {
	hdr    [bhsLen + 4]byte
	ddig   [4]byte
	data   []byte
	snMode uint8
	t      *task  // set: suppressed once the task is aborted
	last   bool   // recycle t after this PDU
	skip   bool   // nothing to write (release marker)
	after  func() // run after the write (logout: close)
}

var outPool = sync.Pool{New: func() any { return new(outPDU) }}

func getOut() *outPDU {
	p := outPool.Get().(*outPDU)
	*p = outPDU{}
	return p
}

func (p *outPDU) bhs() *bhs { return (*bhs)(p.hdr[:bhsLen]) }

// queue hands PDUs to the writer in order; it never blocks on the network. While the reader
// goroutine is busy with a PDU it will flush the queue itself before it next blocks, so only
// PDUs queued while it waits for input wake the writer goroutine.
func (c *conn) queue(ps ...*outPDU) {
	n := 0
	for _, p := range ps {
		n += len(p.data)
	}
	c.wmu.Lock()
	c.wq = append(c.wq, ps...)
	c.wmu.Unlock()
	c.pendingBytes.Add(int64(n))
	c.pending.Add(int32(len(ps)))
	if !c.readerBusy.Load() {
		c.kick()
	}
}

func (c *conn) queue1(p *outPDU) {
	c.wmu.Lock()
	c.wq = append(c.wq, p)
	c.wmu.Unlock()
	c.pendingBytes.Add(int64(len(p.data)))
	c.pending.Add(1)
	if !c.readerBusy.Load() {
		c.kick()
	}
}

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
		if c.pending.Load() == 0 {
			return
		}
	}
	c.kick()
}

// readerFlushLimit bounds what the reader writes itself: beyond it the writer goroutine takes
// over, so big Data-In drains on one core while the reader executes the next commands.
const readerFlushLimit = 64 << 10

// writeLoop flushes whenever kicked; StatSN is assigned at flush time under wlock so it follows
// the wire order whoever writes.
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
	}
}

// flushLocked writes all queued PDUs, one writev per batch. Caller holds wlock.
func (c *conn) flushLocked() error {
	hd, dd := c.params.HeaderDigest, c.params.DataDigest
	for {
		c.wmu.Lock()
		if len(c.wq) == 0 {
			c.wmu.Unlock()
			return nil
		}
		batch := c.wq
		c.wq = c.spare[:0]
		c.wmu.Unlock()
		c.pending.Add(-int32(len(batch)))
		taken := 0
		for _, p := range batch {
			taken += len(p.data)
		}
		c.pendingBytes.Add(-int64(taken))

		exp, maxSN := c.sess.snapshot()
		iov := c.iov[:0]
		for _, p := range batch {
			if p.skip || (p.t != nil && p.t.aborted.Load()) {
				p.skip = true
				continue
			}
			h := p.bhs()
			switch p.snMode {
			case snCarry:
				h.setU32(offCmdSN, c.statSN)
			case snAdvance:
				h.setU32(offCmdSN, c.statSN)
				c.statSN++
			}
			h.setU32(offExpStatSN, exp)
			h.setU32(offMaxCmdSN, maxSN)
			h.setDataLen(len(p.data))
			n := bhsLen
			if hd {
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
				if dd {
					binary.LittleEndian.PutUint32(p.ddig[:], crc32c(crc32c(0, p.data), pad))
					iov = append(iov, p.ddig[:])
				}
			}
		}
		var werr error
		if len(iov) > 0 {
			c.nb = iov
			_, werr = c.nb.WriteTo(c.nc)
		}
		for i := range iov {
			iov[i] = nil
		}
		c.iov = iov[:0]
		for i, p := range batch {
			if p.after != nil && (!p.skip || p.t == nil) {
				p.after()
			}
			if p.last && p.t != nil {
				c.recycle(p.t)
			}
			outPool.Put(p)
			batch[i] = nil
		}
		c.spare = batch[:0]
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

// --- NOP-In pings ---

func (c *conn) pingLoop() {
	defer close(c.pdone)
	defer c.recoverAndKill("pinger")
	iv := c.srv.opts.NopInterval
	tk := time.NewTicker(iv)
	defer tk.Stop()
	idle := time.Duration(0)
	for {
		select {
		case <-c.stop:
			return
		case <-tk.C:
		}
		if c.recvSeen.Swap(false) {
			idle = 0
			continue
		}
		idle += iv
		if idle > c.srv.opts.NopTimeout {
			c.log.Info("initiator did not answer NOP-In; closing", "idle", idle)
			c.kill()
			return
		}
		c.pingTTT++
		if c.pingTTT == reservedTag {
			c.pingTTT = 1
		}
		p := getOut()
		h := p.bhs()
		h[0] = opNopIn
		h[1] = flagFinal
		h.setU32(offITT, reservedTag)
		h.setU32(offTTT, c.pingTTT)
		p.snMode = snCarry
		c.queue1(p)
	}
}

// requestLogout sends an Async Message asking the initiator to log out (server shutdown).
func (c *conn) requestLogout() {
	if !c.loggedIn.Load() {
		c.kill()
		return
	}
	p := getOut()
	h := p.bhs()
	h[0] = opAsync
	h[1] = flagFinal
	h.setU32(offITT, reservedTag)
	h[36] = 1                                // AsyncEvent: target requests logout
	binary.BigEndian.PutUint16(h[42:44], 10) // Parameter3: seconds to log out in
	p.snMode = snAdvance
	c.queue1(p)
}

// --- reader ---

type protoError struct {
	reason byte
	msg    string
}

func (e *protoError) Error() string { return e.msg }

func (c *conn) readLoop() error {
	var h bhs
	for {
		if c.br.Buffered() < bhsLen {
			// About to block for input: write what this goroutine produced first.
			c.readerBusy.Store(false)
			c.readerFlush()
		}
		ahs, err := c.pr.readHeader(&h)
		if err != nil {
			c.readerBusy.Store(false)
			return fmt.Errorf("read PDU header: %w", err)
		}
		c.readerBusy.Store(true)
		c.recvSeen.Store(true)
		err = c.handle(&h, ahs)
		if err == nil && (c.pending.Load() >= 32 || c.pendingBytes.Load() > readerFlushLimit) {
			c.readerFlush()
		}
		if err != nil {
			c.readerBusy.Store(false)
			var pe *protoError
			if errors.As(err, &pe) {
				c.log.Info("protocol error; closing connection", "err", pe.msg, "opcode", h.opcode())
				c.reject(&h, pe.reason)
				c.closeAfterFlush()
				<-c.stop
				return nil
			}
			return fmt.Errorf("PDU opcode 0x%02x ITT 0x%x: %w", h.opcode(), h.itt(), err)
		}
	}
}

// closeAfterFlush closes the connection once everything queued so far is written (or after a
// grace period if the writer is stuck).
func (c *conn) closeAfterFlush() {
	p := getOut()
	p.skip = true
	p.after = c.kill
	c.queue1(p)
	c.kick()
	time.AfterFunc(2*time.Second, c.kill)
}

func (c *conn) reject(h *bhs, reason byte) {
	p := getOut()
	rh := p.bhs()
	rh[0] = opReject
	rh[1] = flagFinal
	rh[2] = reason
	rh.setU32(offITT, reservedTag)
	p.data = append([]byte(nil), h[:]...)
	p.snMode = snAdvance
	c.queue1(p)
}

func (c *conn) handle(h *bhs, ahs []byte) error {
	op := h.opcode()
	if c.sess.discovery && op != opTextReq && op != opLogoutReq && op != opNopOut {
		if err := c.pr.discard(h.dataLen()); err != nil {
			return err
		}
		c.reject(h, rejectProtocol)
		return nil
	}
	switch op {
	case opSCSICmd:
		return c.handleCommand(h, ahs)
	case opDataOut:
		return c.handleDataOut(h)
	case opNopOut:
		return c.handleNopOut(h)
	case opTMFReq:
		return c.handleTMF(h)
	case opTextReq:
		return c.handleText(h)
	case opLogoutReq:
		return c.handleLogout(h)
	case opSNACK:
		if err := c.pr.discard(h.dataLen()); err != nil {
			return err
		}
		c.reject(h, rejectProtocol) // SNACK needs ERL >= 1
		return nil
	case opLoginReq:
		return &protoError{rejectProtocol, "login request in full feature phase"}
	default:
		if err := c.pr.discard(h.dataLen()); err != nil {
			return err
		}
		c.reject(h, rejectNotSupported)
		return nil
	}
}

// --- NOP ---

func (c *conn) handleNopOut(h *bhs) error {
	n := h.dataLen()
	if n > int(c.params.TargetRecvDSL) {
		return &protoError{rejectProtocol, "NOP-Out data beyond MaxRecvDataSegmentLength"}
	}
	var data []byte
	itt := h.itt()
	if itt != reservedTag && n > 0 {
		data = make([]byte, n)
		if err := c.pr.readData(data); err != nil {
			return c.dataErr(h, err)
		}
	} else if err := c.pr.discard(n); err != nil {
		return err
	}
	if !c.acceptInstant(h) {
		return nil
	}
	if itt == reservedTag {
		return nil // answer to our ping, or a ping that wants no answer
	}
	p := getOut()
	rh := p.bhs()
	rh[0] = opNopIn
	rh[1] = flagFinal
	copy(rh[8:16], h[8:16])
	rh.setU32(offITT, itt)
	rh.setU32(offTTT, reservedTag)
	p.data = data
	p.snMode = snAdvance
	c.queue1(p)
	return nil
}

// acceptInstant applies the CmdSN window to a non-SCSI request, which is done as soon as it is
// handled: a non-immediate one takes its CmdSN and frees the slot at once (so MaxCmdSN moves).
func (c *conn) acceptInstant(h *bhs) bool {
	if !c.sess.accept(h.u32(offCmdSN), h.immediate()) {
		return false
	}
	if !h.immediate() {
		c.sess.done()
	}
	return true
}

func (c *conn) dataErr(h *bhs, err error) error {
	if errors.Is(err, errDigest) {
		return &protoError{rejectDataDigest, err.Error()}
	}
	return err
}

// --- Text ---

func (c *conn) handleText(h *bhs) error {
	n := h.dataLen()
	if n > int(c.params.TargetRecvDSL) || n > maxLoginData {
		return &protoError{rejectProtocol, "text data too long"}
	}
	data := make([]byte, n)
	if err := c.pr.readData(data); err != nil {
		return c.dataErr(h, err)
	}
	if !c.acceptInstant(h) {
		return nil
	}
	itt, ttt := h.itt(), h.u32(offTTT)
	ts := &c.text
	if ts.itt != itt {
		ts.partial, ts.pending = nil, nil
		ts.itt = itt
	}
	if len(ts.pending) > 0 && ttt == ts.ttt && len(data) == 0 {
		c.sendTextChunk(h) // initiator asks for the next part of a long answer
		return nil
	}
	ts.pending = nil
	ts.partial = append(ts.partial, data...)
	if len(ts.partial) > maxLoginData {
		return &protoError{rejectProtocol, "text request too long"}
	}
	if h.flags()&flagContinue != 0 {
		// More request text follows: acknowledge with an empty, non-final response.
		c.sendTextChunk(h)
		return nil
	}
	kvs, _, err := parseTextKeys(ts.partial, false)
	ts.partial = nil
	if err != nil {
		c.reject(h, rejectProtocol)
		return nil
	}
	var out []textKV
	for _, kv := range kvs {
		switch kv.Key {
		case "SendTargets":
			out = append(out, c.sendTargets(kv.Value)...)
		default:
			if _, known := keyTable[kv.Key]; known {
				// Operational keys are not renegotiated in full feature phase.
				out = append(out, textKV{kv.Key, valReject})
			} else {
				out = append(out, textKV{kv.Key, valNotUnderstood})
			}
		}
	}
	ts.pending = appendTextKeys(nil, out)
	ts.final = true
	c.sendTextChunk(h)
	return nil
}

// sendTextChunk sends the next part of the pending text answer (empty while request text is
// still arriving), splitting at the initiator's MaxRecvDataSegmentLength with the C bit.
func (c *conn) sendTextChunk(h *bhs) {
	ts := &c.text
	chunk := ts.pending
	more := false
	if lim := int(c.params.InitiatorRecvDSL); len(chunk) > lim {
		chunk, more = chunk[:lim], true
	}
	ts.pending = ts.pending[len(chunk):]
	p := getOut()
	rh := p.bhs()
	rh[0] = opTextResp
	copy(rh[8:16], h[8:16])
	rh.setU32(offITT, h.itt())
	if ts.final && !more {
		rh[1] = flagFinal
		rh.setU32(offTTT, reservedTag)
		ts.pending, ts.final = nil, false
	} else {
		if more {
			rh[1] = flagContinue
		}
		ts.ttt = c.nextTag() | 0x80000000
		rh.setU32(offTTT, ts.ttt)
	}
	p.data = chunk
	p.snMode = snAdvance
	c.queue1(p)
}

// sendTargets lists the tenant's targets this initiator may log in to, at the portal the
// initiator dialled.
func (c *conn) sendTargets(which string) []textKV {
	addr := portalAddr(c.nc.LocalAddr())
	var out []textKV
	emit := func(tg *Target) {
		if tg.closed.Load() {
			return
		}
		out = append(out, textKV{"TargetName", tg.cfg.IQN}, textKV{"TargetAddress", addr + ",1"})
	}
	initiator := c.sess.key.initiator
	switch which {
	case "All":
		if !c.sess.discovery {
			// In a normal session only the session's target is reported (RFC 7143 §13.3).
			emit(c.sess.tg)
			break
		}
		for _, tg := range c.tenant.Targets {
			if tg.allows(initiator) {
				emit(tg)
			}
		}
	case "":
		if c.sess.tg != nil {
			emit(c.sess.tg)
		}
	default:
		if tg := c.tenant.find(which); tg != nil && tg.allows(initiator) {
			emit(tg)
		}
	}
	return out
}

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

// --- Logout ---

func (c *conn) handleLogout(h *bhs) error {
	if err := c.pr.discard(h.dataLen()); err != nil {
		return err
	}
	if !c.acceptInstant(h) {
		return nil
	}
	reason := h.flags() & 0x7f
	cid := binary.BigEndian.Uint16(h[20:22])
	var response byte
	closing := true
	switch reason {
	case 0: // close session
	case 1: // close connection: only this one exists (MaxConnections=1)
		if cid != c.cid {
			response = 1 // CID not found
			closing = false
		}
	case 2:
		response = 2 // connection recovery not supported (ERL 0)
		closing = false
	default:
		c.reject(h, rejectInvalidField)
		return nil
	}
	if closing {
		c.abortAll(nil)
		c.execs.Wait()
	}
	p := getOut()
	rh := p.bhs()
	rh[0] = opLogoutResp
	rh[1] = flagFinal
	rh[2] = response
	rh.setU32(offITT, h.itt())
	binary.BigEndian.PutUint16(rh[40:42], uint16(c.params.DefaultTime2Wait))
	binary.BigEndian.PutUint16(rh[42:44], uint16(c.params.DefaultTime2Retain))
	p.snMode = snAdvance
	if closing {
		p.after = c.kill
	}
	c.queue1(p)
	c.kick()
	if closing {
		<-c.stop
		return errLogout
	}
	return nil
}
