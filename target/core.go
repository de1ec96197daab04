package target

import (
	"encoding/binary"
	"log/slog"
	"unsafe"
)

// core is the full feature phase of one connection (and of its session: MaxConnections=1) as a
// pure state machine, in the manner of etcd's raft: the I/O edge (conn) feeds it events, then
// carries out the actions it accumulated (ready) and acknowledges them (advance). It never
// blocks, starts a goroutine, reads a clock or touches a socket; time is the tick event.
//
// Every resource the connection takes (commands and buffer bytes in the ledger, pooled buffers,
// queued PDUs, window slots) is owned by a task, a queued PDU or the core itself, and given
// back on every path: completion, abort, task management, logout, connection end. The invariant
// the tests and the fuzzer check: once close has been stepped and every command handed out has
// completed and every PDU handed out was reported sent, held() is all zero.
//
// The edge calls it under one mutex; it is not safe for concurrent use by itself.
type core struct {
	cfg coreConfig

	win     cmdWindow
	statSN  uint32
	nextTag uint32
	tasks   map[uint32]*task // by ITT: commands not yet answered
	imm     int              // immediate SCSI commands not yet freed
	held    [numResources]int64
	credit  [numResources]int64 // taken from the ledger, not yet used (see take)

	rx   rxState // the PDU whose header arrived and whose data has not
	text textState

	act       actions
	sendBytes int64 // data bytes of act.send
	inflight  int   // PDUs handed to the edge by takeSend and not yet reported sent
	ctlBytes  int64 // queued or in-flight bytes of PDUs that are not command data

	ending  bool // no more input is taken; the edge closes once act.send is written
	closed  bool
	logout  bool      // a logout is pending: input is ignored
	waiters []*waiter // responses held until the tasks they wait for have ended

	counts counters              // what the session did, for status
	luns   map[uint64]*lunCounts // per LUN, for metrics (folded by the edge at the end)

	idle      int  // ticks without a complete PDU
	gotPDU    bool // a PDU completed since the last tick
	stall     int  // ticks with output pending and nothing written
	wrote     bool // something was written since the last tick
	pingTag   uint32
	asyncSent bool
}

// counters are what a session did, read by Server.Sessions.
type counters struct {
	commands     uint64 // SCSI commands answered
	readBytes    uint64 // Data-In bytes
	writtenBytes uint64 // Data-Out and immediate data bytes of answered WRITEs
}

// coreConfig is fixed at login.
type coreConfig struct {
	p         params
	sess      *session
	tenant    *Tenant
	led       *ledger
	bufs      *bufPool
	portal    string // host:port the initiator dialled, for SendTargets
	depth     uint32 // CmdSN window
	statSN    uint32 // first StatSN of the full feature phase
	expCmdSN  uint32 // from the login
	connBytes int64  // data bytes one connection may hold
	// Timing in ticks: ping after nopEvery idle ticks, close after nopEvery+nopTimeout, and
	// close after stallTicks with output pending and none of it written.
	nopEvery, nopTimeout, stallTicks int
}

// actions are what the edge must do, in order, after stepping the core.
type actions struct {
	send []*outPDU   // PDUs to write, in this order
	run  []*task     // commands (and resets) to execute; each ends with completed
	logs []logRecord // to log with the connection's attributes
	end  endMode
}

type endMode uint8

const (
	endNone      endMode = iota
	endAfterSend         // close once everything queued has been written
	endNow               // close at once (peer does not read)
)

// logRecord is a log line the core asks for. limited marks refusals the edge rate-limits per
// tenant and reason, so a hostile tenant cannot flood the log.
type logRecord struct {
	level   slog.Level
	msg     string
	attrs   []any
	limited string // rate-limit key; "" logs every time
}

// landing tells the edge where the data segment of the PDU whose header it read goes.
type landing struct {
	buf  []byte // read exactly len(buf) bytes here (then padding and digest)
	skip int    // or skip this many data bytes
	wait bool   // neither: input must wait until output drains; offer the header again
}

type rxKind uint8

const (
	rxNone rxKind = iota
	rxCommand
	rxDataOut
	rxControl // NOP-Out, Text: data in a pooled control buffer
	rxSkip
)

// rxState is the PDU between header and data.
type rxState struct {
	kind rxKind
	h    bhs
	t    *task
	b    *burst
	bi   int
	off  uint32
	n    uint32
	ctl  *[]byte // pooled buffer of a control PDU
	ctlN int64   // its ledger bytes
}

// outPDU is one PDU queued for the wire.
type outPDU struct {
	hdr  [bhsLen + 4]byte
	ddig [4]byte
	data []byte
	t    *task   // holds a reference on t until written or dropped
	ctl  int64   // ledger bytes given back once written
	cbuf *[]byte // pooled buffer to return once written
	cost int64   // counted in core.ctlBytes
}

func (p *outPDU) bhs() *bhs { return (*bhs)(p.hdr[:bhsLen]) }

// outPDUSize is charged to reads per Data-In PDU: a 64 MiB read cut at a 512-byte
// MaxRecvDataSegmentLength queues 131072 of them.
const outPDUSize = int64(unsafe.Sizeof(outPDU{}))

// Limits of one connection that are not per tenant.
const (
	// maxImmediate bounds immediate (window-less) SCSI commands in flight (§11.17.1).
	maxImmediate = 16
	// ctlQueueLimit bounds queued control output (NOP-In echoes, text answers, rejects):
	// beyond it the core stops taking input until the peer reads.
	ctlQueueLimit = 1 << 20
)

func newCore(cfg coreConfig) *core {
	c := &core{cfg: cfg, tasks: make(map[uint32]*task)}
	c.win = newCmdWindow(cfg.expCmdSN, cfg.depth, &cfg.tenant.fair.sessWindow)
	c.statSN = cfg.statSN
	return c
}

// ready returns the actions accumulated since the last advance.
func (c *core) ready() *actions { return &c.act }

// advance acknowledges that run and logs were taken (send is taken by takeSend).
func (c *core) advance() {
	clear(c.act.run)
	c.act.run = c.act.run[:0]
	clear(c.act.logs)
	c.act.logs = c.act.logs[:0]
}

// takeSend hands queued PDUs to the edge for writing, in order, up to about maxBatchBytes of
// data (at least one PDU); it must report them with sent. Bounded batches report progress to
// the stall clock and give buffers back while a slow peer is still reading.
func (c *core) takeSend(dst []*outPDU) []*outPDU {
	n, bytes := 0, int64(0)
	for n < len(c.act.send) && (n == 0 || bytes < maxBatchBytes) {
		bytes += int64(len(c.act.send[n].data))
		n++
	}
	dst = append(dst, c.act.send[:n]...)
	rest := copy(c.act.send, c.act.send[n:])
	clear(c.act.send[rest:])
	c.act.send = c.act.send[:rest]
	c.sendBytes -= bytes
	c.inflight += n
	return dst
}

// maxBatchBytes bounds the data of one batch the edge writes with one writev.
const maxBatchBytes = 4 << 20

// queuedBytes is how many data bytes wait in the send queue.
func (c *core) queuedBytes() int64 { return c.sendBytes }

// sent reports PDUs taken with takeSend as written (or dropped, when the connection failed).
func (c *core) sent(batch []*outPDU) {
	for i, p := range batch {
		c.dropPDU(p)
		batch[i] = nil
	}
	c.inflight -= len(batch)
	if len(batch) > 0 {
		c.wrote = true
	}
}

func (c *core) logf(level slog.Level, limited, msg string, attrs ...any) {
	c.act.logs = append(c.act.logs, logRecord{level: level, msg: msg, attrs: attrs, limited: limited})
}

// --- input ---

// header is the event "a BHS (and AHS) arrived". The edge reads the data segment as the
// landing says, then steps data.
func (c *core) header(h *bhs, ahs []byte) landing {
	n := h.dataLen()
	if c.ending || c.closed || c.logout {
		return c.skipRx(n)
	}
	if c.ctlBytes > ctlQueueLimit {
		return landing{wait: true}
	}
	c.rx = rxState{h: *h}
	op := h.opcode()
	if c.cfg.sess.discovery && op != opTextReq && op != opLogoutReq && op != opNopOut {
		c.reject(h, rejectProtocol)
		return c.skipRx(n)
	}
	switch op {
	case opSCSICmd:
		return c.commandHeader(h, ahs)
	case opDataOut:
		return c.dataOutHeader(h)
	case opNopOut:
		return c.controlHeader(h, int(c.cfg.p.TargetRecvDSL))
	case opTextReq:
		return c.controlHeader(h, min(int(c.cfg.p.TargetRecvDSL), maxLoginData))
	case opTMFReq, opLogoutReq:
		return c.controlHeader(h, 0)
	case opSNACK:
		c.reject(h, rejectProtocol) // SNACK needs ERL >= 1
		return c.skipRx(n)
	case opLoginReq:
		c.protocolError(h, rejectProtocol, "login request in full feature phase")
		return c.skipRx(n)
	default:
		c.reject(h, rejectNotSupported)
		return c.skipRx(n)
	}
}

func (c *core) skipRx(n int) landing {
	c.rx.kind = rxSkip
	return landing{skip: n}
}

// data is the event "the data segment of the last header was read into its landing".
// digestOK is false when the data digest did not match.
func (c *core) data(digestOK bool) {
	rx := c.rx
	c.rx = rxState{}
	if rx.kind == rxNone {
		return
	}
	c.gotPDU = true
	if !digestOK {
		if rx.ctl != nil {
			c.giveCtl(rx.ctl, rx.ctlN)
		}
		if rx.kind == rxCommand || rx.kind == rxDataOut {
			c.abortTask(rx.t)
		}
		c.protocolError(&rx.h, rejectDataDigest, "data digest mismatch")
		return
	}
	switch rx.kind {
	case rxCommand:
		c.commandData(&rx)
	case rxDataOut:
		c.dataOutData(&rx)
	case rxControl:
		c.controlData(&rx)
	}
}

// controlHeader lands the data of a non-SCSI request in a pooled buffer charged to the
// tenant; limit bounds it (0: no data expected, any is skipped).
func (c *core) controlHeader(h *bhs, limit int) landing {
	n := h.dataLen()
	if n > limit {
		if limit == 0 {
			c.rx.kind = rxControl
			return landing{skip: n}
		}
		c.protocolError(h, rejectProtocol, "data segment beyond MaxRecvDataSegmentLength")
		return c.skipRx(n)
	}
	c.rx.kind = rxControl
	if n == 0 {
		return landing{}
	}
	if h.opcode() == opNopOut && h.itt() == reservedTag {
		return landing{skip: n} // a ping that wants no answer: its data goes nowhere
	}
	if r := c.take(resBytes, int64(n)); r != granted {
		c.rx = rxState{}
		c.logf(slog.LevelInfo, "ping-pressure", "control data waits for buffer space", "bytes", n, "refused_by", r.String())
		return landing{wait: true}
	}
	b := c.cfg.bufs.get(n)
	c.rx.ctl, c.rx.ctlN = b, int64(n)
	return landing{buf: *b}
}

func (c *core) controlData(rx *rxState) {
	h := &rx.h
	var data []byte
	if rx.ctl != nil {
		data = *rx.ctl
	}
	if !c.acceptInstant(h) {
		if rx.ctl != nil {
			c.giveCtl(rx.ctl, rx.ctlN)
		}
		return
	}
	switch h.opcode() {
	case opNopOut:
		c.nopOut(h, rx)
	case opTextReq:
		c.textRequest(h, data)
		if rx.ctl != nil {
			c.giveCtl(rx.ctl, rx.ctlN)
		}
	case opTMFReq:
		c.tmf(h)
	case opLogoutReq:
		c.logoutRequest(h)
	}
}

// acceptInstant applies the CmdSN window to a non-SCSI request, which is done as soon as it is
// handled: a non-immediate one takes its CmdSN and frees the slot at once (so MaxCmdSN moves).
func (c *core) acceptInstant(h *bhs) bool {
	if !c.win.accept(h.u32(offCmdSN), h.immediate()) {
		return false
	}
	if !h.immediate() {
		c.win.done()
	}
	return true
}

// --- time and end ---

// tick is the event "a tick of time passed" (the edge ticks every NopInterval).
func (c *core) tick() {
	if c.closed || c.ending {
		return
	}
	if c.gotPDU {
		c.idle, c.gotPDU = 0, false
	} else {
		c.idle++
	}
	pending := len(c.act.send) > 0 || c.inflight > 0
	if pending && !c.wrote {
		c.stall++
	} else {
		c.stall = 0
	}
	c.wrote = false
	switch {
	case c.stall >= c.cfg.stallTicks:
		c.logf(slog.LevelInfo, "", "initiator does not read; closing the connection", "ticks", c.stall, "queued_pdus", len(c.act.send)+c.inflight)
		c.act.end = endNow
		c.ending = true
	case c.idle >= c.cfg.nopEvery+c.cfg.nopTimeout:
		what := "initiator did not answer NOP-In; closing the connection"
		if c.rx.kind != rxNone {
			what = "initiator stalled in the middle of a PDU; closing the connection"
		}
		c.logf(slog.LevelInfo, "", what, "idle_ticks", c.idle)
		c.act.end = endNow
		c.ending = true
	case c.idle > 0 && c.idle%c.cfg.nopEvery == 0:
		c.ping()
	}
}

func (c *core) ping() {
	c.pingTag++
	if c.pingTag == reservedTag {
		c.pingTag = 1
	}
	p := c.newPDU(opNopIn, flagFinal)
	h := p.bhs()
	h.setU32(offITT, reservedTag)
	h.setU32(offTTT, c.pingTag)
	c.emit(p, snCarry)
}

// requestLogout asks the initiator to log out (Async Message, event 1), e.g. at shutdown.
func (c *core) requestLogout(seconds uint16) {
	if c.closed || c.ending || c.asyncSent {
		return
	}
	c.asyncSent = true
	p := c.newPDU(opAsync, flagFinal)
	h := p.bhs()
	h.setU32(offITT, reservedTag)
	h[offAsyncEvent] = asyncLogoutRequest
	binary.BigEndian.PutUint16(h[offAsyncParam3:], seconds)
	c.emit(p, snAdvance)
}

// close is the event "the connection is gone". Everything not held by a running command or a
// PDU being written is given back now; those give theirs back through completed and sent.
func (c *core) close() {
	if c.closed {
		return
	}
	c.closed, c.ending = true, true
	if c.rx.ctl != nil {
		c.giveCtl(c.rx.ctl, c.rx.ctlN)
	}
	c.rx = rxState{}
	for _, t := range c.tasks {
		c.abortTask(t)
	}
	for _, p := range c.act.send {
		c.dropPDU(p)
	}
	clear(c.act.send)
	c.act.send = c.act.send[:0]
	c.sendBytes = 0
	for _, w := range c.waiters {
		c.dropPDU(w.pdu)
		w.pdu = nil
	}
	c.waiters = nil
	c.resetText()
	c.returnCredit()
}

// protocolError rejects the PDU and ends the connection once the reject is written.
func (c *core) protocolError(h *bhs, reason byte, why string) {
	c.logf(slog.LevelInfo, "protocol", "protocol error; closing the connection", "err", why, "opcode", h.opcode())
	c.reject(h, reason)
	c.act.end = endAfterSend
	c.ending = true
}

// --- accounting ---

// take charges n of r to the connection, its tenant and the server.
//
// The connection keeps a little credit taken from the ledger (creditChunk of each resource):
// most commands are then charged and given back without touching the tenant's and the
// server's counters, which every connection of the tenant (and of the server) shares, so two
// busy connections on two cores do not bounce those cache lines at every command. The credit
// counts as held by the tenant, at most 2×creditChunk per connection, and is given back at
// close.
func (c *core) take(r resource, n int64) refusal {
	if r == resBytes && c.held[r]+n > c.cfg.connBytes {
		return overConn
	}
	if c.credit[r] < n {
		need := n - c.credit[r]
		grab := max(need, creditChunk[r])
		rf := c.cfg.led.take(&c.cfg.tenant.acct, r, grab)
		if rf != granted && grab > need {
			// Near a limit, the chunk may not fit where the command does.
			grab = need
			rf = c.cfg.led.take(&c.cfg.tenant.acct, r, grab)
		}
		if rf != granted {
			return rf
		}
		c.credit[r] += grab
	}
	c.credit[r] -= n
	c.held[r] += n
	return granted
}

func (c *core) give(r resource, n int64) {
	if n == 0 {
		return
	}
	c.held[r] -= n
	c.credit[r] += n
	if c.closed {
		c.returnCredit()
	} else if c.credit[r] > 2*creditChunk[r] {
		excess := c.credit[r] - creditChunk[r]
		c.credit[r] -= excess
		c.cfg.led.give(&c.cfg.tenant.acct, r, excess)
	}
}

// creditChunk is how much of each resource a connection keeps in hand (see take).
var creditChunk = [numResources]int64{resCommands: 8, resBytes: 1 << 20}

// returnCredit gives every unused credit back to the ledger.
func (c *core) returnCredit() {
	for r, n := range c.credit {
		if n > 0 {
			c.cfg.led.give(&c.cfg.tenant.acct, resource(r), n)
			c.credit[r] = 0
		}
	}
}

func (c *core) giveCtl(b *[]byte, n int64) {
	c.cfg.bufs.put(b)
	c.give(resBytes, n)
}

// --- output ---

// statSN modes of an outgoing PDU.
const (
	snNone    = iota // no StatSN field (Data-In without status)
	snCarry          // carries the next StatSN without consuming it (R2T, NOP-In ping)
	snAdvance        // consumes a StatSN
)

var outPool = syncPool[outPDU]{}

func (c *core) newPDU(op, flags byte) *outPDU {
	p := outPool.get()
	*p = outPDU{}
	p.hdr[0], p.hdr[1] = op, flags
	return p
}

// emit queues p with its sequence numbers filled in now, so StatSN follows the wire order.
// Every PDU that does not carry command data counts against the control queue limit.
func (c *core) emit(p *outPDU, sn int) {
	h := p.bhs()
	switch sn {
	case snCarry:
		h.setU32(offStatSN, c.statSN)
	case snAdvance:
		h.setU32(offStatSN, c.statSN)
		c.statSN++
	}
	h.setU32(offExpCmdSN, c.win.expCmdSN)
	h.setU32(offMaxCmdSN, c.win.maxCmdSN())
	h.setDataLen(len(p.data))
	if p.t == nil || p.hdr[0] != opDataIn {
		p.cost = bhsLen + int64(len(p.data))
		c.ctlBytes += p.cost
	}
	c.act.send = append(c.act.send, p)
	c.sendBytes += int64(len(p.data))
}

// dropPDU gives back what p holds, written or not.
func (c *core) dropPDU(p *outPDU) {
	c.ctlBytes -= p.cost
	if p.cbuf != nil {
		c.cfg.bufs.put(p.cbuf)
	}
	c.give(resBytes, p.ctl)
	if p.t != nil {
		c.unref(p.t)
	}
	*p = outPDU{}
	outPool.put(p)
}

func (c *core) reject(h *bhs, reason byte) {
	p := c.newPDU(opReject, flagFinal)
	rh := p.bhs()
	rh[offReason] = reason
	rh.setU32(offITT, reservedTag)
	// The rejected header goes back as data: a small allocation, bounded by ctlQueueLimit.
	p.data = append(make([]byte, 0, bhsLen), h[:]...)
	c.emit(p, snAdvance)
}

// nextTTT hands out target transfer tags (never the reserved value).
func (c *core) nextTTT() uint32 {
	c.nextTag++
	if c.nextTag == reservedTag {
		c.nextTag = 1
	}
	return c.nextTag
}

// heldNothing reports whether the connection holds no resource at all (the close invariant).
func (c *core) heldNothing() bool {
	return c.held == [numResources]int64{} && c.credit == [numResources]int64{} && len(c.tasks) == 0 && c.inflight == 0 &&
		len(c.act.send) == 0 && c.ctlBytes == 0 && c.imm == 0 && len(c.waiters) == 0
}

// waiter is a response (TMF, Logout) held until the tasks it waits for have ended
// (RFC 7143 §4.2.3.3: "function complete" must not race a WRITE that can still land).
type waiter struct {
	pdu     *outPDU
	pending int
	end     bool // end the connection after it is written (logout)
}

func (c *core) release(w *waiter) {
	for i, x := range c.waiters {
		if x == w {
			c.waiters = append(c.waiters[:i], c.waiters[i+1:]...)
			break
		}
	}
	c.emit(w.pdu, snAdvance)
	if w.end {
		c.act.end = endAfterSend
		c.ending = true
	}
}

// hold queues w's response now if nothing is pending, else when the last task it waits for ends.
func (c *core) hold(w *waiter) {
	c.waiters = append(c.waiters, w)
	if w.pending == 0 {
		c.release(w)
	}
}
