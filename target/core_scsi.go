package target

import (
	"encoding/binary"
	"fmt"
	"log/slog"

	"nstarget/target/scsi"
)

// burst is one Data-Out sequence the target expects: the unsolicited one (TTT 0xffffffff) or
// one per R2T.
type burst struct {
	ttt    uint32
	offset uint32
	length uint32
	got    uint32
	dataSN uint32
}

type taskKind uint8

const (
	kindSCSI        taskKind = iota
	kindLUNReset             // a LUN RESET's device reset, run like a command
	kindTargetReset          // a TARGET WARM RESET's device reset
	kindNexusLoss            // a logout's end of the I_T nexus (SPC-2 reservations released)
)

// task is one SCSI command (or one piece of device work a response waits for: a TMF reset, a
// logout's nexus loss). It is freed, giving back its buffer, its ledger bytes and its command
// slot, when its last reference goes: its entry in core.tasks, its execution, and each PDU of
// it that is queued or being written.
type task struct {
	kind      taskKind
	itt       uint32
	lunRaw    uint64
	edtl      uint32
	read      bool
	write     bool
	counted   bool // holds a CmdSN window slot
	immediate bool // counted in core.imm
	listed    bool // in core.tasks
	running   bool // handed to the edge to execute
	aborted   bool // its response is dropped
	refs      int
	bytes     int64 // ledger bytes held
	command   bool  // holds one resCommands unit
	buf       *[]byte
	cmd       scsi.Command
	cdb       [maxCDBLen]byte

	received uint32
	unsol    burst
	hasUnsol bool
	bursts   []burst
	r2tNext  uint32
	r2tSN    uint32

	waiters []*waiter // held responses waiting for this task to stop running
	sense   [2 + 252]byte
}

var taskPool = syncPool[task]{}

func (c *core) newTask() *task {
	t := taskPool.get()
	bursts := t.bursts[:0]
	*t = task{bursts: bursts}
	return t
}

func (c *core) unref(t *task) {
	t.refs--
	if t.refs > 0 {
		return
	}
	if t.buf != nil {
		c.cfg.bufs.put(t.buf)
		t.buf = nil
	}
	c.give(resBytes, t.bytes)
	if t.command {
		c.give(resCommands, 1)
	}
	if t.immediate {
		c.imm--
	}
	bursts := t.bursts[:0]
	*t = task{bursts: bursts}
	taskPool.put(t)
}

// unlist removes t from the task map and frees its window slot (once).
func (c *core) unlist(t *task) {
	if !t.listed {
		return
	}
	t.listed = false
	delete(c.tasks, t.itt)
	if t.counted {
		t.counted = false
		c.win.done()
	}
	c.unref(t)
}

// --- SCSI Command ---

func (c *core) commandHeader(h *bhs, ahs []byte) landing {
	n := h.dataLen()
	fl := h.flags()
	edtl := h.u32(offEDTL)
	if !c.win.accept(h.u32(offCmdSN), h.immediate()) {
		// Outside the window: silently ignored (RFC 7143 §4.2.2.1), data included.
		return c.skipRx(n)
	}
	if h.immediate() && c.imm >= maxImmediate {
		// Immediate commands bypass the CmdSN window; bound them separately (§11.17.1).
		c.reject(h, rejectImmediate)
		return c.skipRx(n)
	}
	if _, dup := c.tasks[h.itt()]; dup {
		if !h.immediate() {
			c.win.done()
		}
		c.reject(h, rejectTaskInProgress)
		return c.skipRx(n)
	}
	t := c.newTask()
	t.itt = h.itt()
	t.lunRaw = h.lunRaw()
	t.edtl = edtl
	t.read = fl&flagRead != 0
	t.write = fl&flagWrite != 0
	t.counted = !h.immediate()
	t.listed, t.refs = true, 1
	c.tasks[t.itt] = t
	if h.immediate() {
		t.immediate = true
		c.imm++
	}
	cdb, err := cdbFromPDU(h, ahs, t.cdb[:])
	if err != nil {
		c.unlist(t)
		c.protocolError(h, rejectProtocol, err.Error())
		return c.skipRx(n)
	}
	t.cmd = scsi.Command{Nexus: &c.cfg.sess.nexus, LUN: scsi.DecodeLUN(t.lunRaw), CDB: cdb, Tag: t.itt, ExpectedLen: edtl}

	if n > 0 && (!t.write || !c.cfg.p.ImmediateData || uint32(n) > edtl ||
		uint32(n) > c.cfg.p.TargetRecvDSL || uint32(n) > c.cfg.p.FirstBurstLength) {
		c.unlist(t)
		c.protocolError(h, rejectProtocol, fmt.Sprintf("bad immediate data (%d bytes, edtl %d)", n, edtl))
		return c.skipRx(n)
	}
	if edtl > maxTransfer || (t.read && t.write) {
		// Refused without touching memory: a status, not a dropped connection.
		c.respond(t, scsi.CheckCondition(scsi.SenseIllegalRequest, 0x24, 0x00))
		return c.skipRx(n)
	}
	if r := c.take(resCommands, 1); r != granted {
		c.taskSetFull(t, resCommands, r)
		return c.skipRx(n)
	}
	t.command = true
	if (t.read || t.write) && edtl > 0 {
		cost := int64(edtl)
		if t.read {
			cost += (int64(edtl)/int64(c.cfg.p.InitiatorRecvDSL) + 1) * outPDUSize
		}
		if r := c.take(resBytes, cost); r != granted {
			// TASK SET FULL asks the initiator to retry later instead of letting one
			// tenant pin unbounded memory.
			c.taskSetFull(t, resBytes, r)
			return c.skipRx(n)
		}
		t.bytes = cost
		t.buf = c.cfg.bufs.get(int(edtl))
	}
	c.rx.kind, c.rx.t = rxCommand, t
	if n > 0 {
		return landing{buf: (*t.buf)[:n]}
	}
	return landing{}
}

func (c *core) taskSetFull(t *task, r resource, why refusal) {
	c.logf(slog.LevelInfo, "task-set-full:"+why.String(), "TASK SET FULL", "resource", r.String(), "refused_by", why.String(),
		"tenant_used", c.cfg.tenant.acct.used[r].Load(), "tenant_limit", c.cfg.tenant.acct.limit[r])
	c.respond(t, scsi.Result{Status: scsi.StatusTaskSetFull})
}

func (c *core) commandData(rx *rxState) {
	t := rx.t
	t.received = uint32(rx.h.dataLen())
	fl := rx.h.flags()
	if !t.write || t.received >= t.edtl {
		c.dispatch(t)
		return
	}
	t.r2tNext = t.received
	if !c.cfg.p.InitialR2T && fl&flagFinal == 0 {
		end := min(c.cfg.p.FirstBurstLength, t.edtl)
		if end > t.received {
			t.hasUnsol = true
			t.unsol = burst{ttt: reservedTag, offset: t.received, length: end - t.received}
			t.r2tNext = end
		}
	}
	c.issueR2Ts(t)
}

// issueR2Ts keeps up to MaxOutstandingR2T bursts requested.
func (c *core) issueR2Ts(t *task) {
	for len(t.bursts) < int(c.cfg.p.MaxOutstandingR2T) && t.r2tNext < t.edtl {
		length := min(c.cfg.p.MaxBurstLength, t.edtl-t.r2tNext)
		b := burst{ttt: c.nextTTT(), offset: t.r2tNext, length: length}
		t.bursts = append(t.bursts, b)
		t.r2tNext += length
		p := c.newPDU(opR2T, flagFinal)
		h := p.bhs()
		binary.BigEndian.PutUint64(h[offLUN:], t.lunRaw)
		h.setU32(offITT, t.itt)
		h.setU32(offTTT, b.ttt)
		h.setU32(offDataSN, t.r2tSN)
		h.setU32(offBufOffset, b.offset)
		h.setU32(offDesiredLen, length)
		t.r2tSN++
		c.attach(p, t)
		c.emit(p, snCarry)
	}
}

func (c *core) attach(p *outPDU, t *task) {
	p.t = t
	t.refs++
}

// --- Data-Out ---

func (c *core) dataOutHeader(h *bhs) landing {
	n := uint32(h.dataLen())
	t := c.tasks[h.itt()]
	if t == nil || t.running || !t.write || t.buf == nil {
		// Data for an aborted or finished task: drop it.
		return c.skipRx(int(n))
	}
	ttt := h.u32(offTTT)
	var b *burst
	bi := -1
	if ttt == reservedTag {
		if t.hasUnsol {
			b = &t.unsol
		}
	} else {
		for i := range t.bursts {
			if t.bursts[i].ttt == ttt {
				b, bi = &t.bursts[i], i
				break
			}
		}
	}
	if b == nil {
		c.failDataOut(t, fmt.Sprintf("Data-Out with unknown TTT 0x%x", ttt), 0x4b, 0x00)
		return c.skipRx(int(n))
	}
	off := h.u32(offBufOffset)
	if h.u32(offDataSN) != b.dataSN {
		c.failDataOut(t, fmt.Sprintf("Data-Out DataSN %d, expected %d", h.u32(offDataSN), b.dataSN), 0x4b, 0x00)
		return c.skipRx(int(n))
	}
	if off != b.offset+b.got || n > b.length-b.got || n > c.cfg.p.TargetRecvDSL {
		c.failDataOut(t, fmt.Sprintf("Data-Out offset %d len %d outside burst %d+%d/%d", off, n, b.offset, b.got, b.length), 0x4b, 0x05)
		return c.skipRx(int(n))
	}
	c.rx.kind, c.rx.t, c.rx.b, c.rx.bi, c.rx.off, c.rx.n = rxDataOut, t, b, bi, off, n
	return landing{buf: (*t.buf)[off : off+n]}
}

func (c *core) dataOutData(rx *rxState) {
	t, b := rx.t, rx.b
	b.got += rx.n
	b.dataSN++
	t.received += rx.n
	if rx.h.flags()&flagFinal != 0 && b.got != b.length {
		c.failDataOut(t, "Data-Out burst ended early", 0x4b, 0x00)
		return
	}
	if b.got == b.length {
		if rx.bi < 0 {
			t.hasUnsol = false
		} else {
			t.bursts = append(t.bursts[:rx.bi], t.bursts[rx.bi+1:]...)
		}
		if t.received < t.edtl {
			c.issueR2Ts(t)
		}
	}
	if t.received == t.edtl {
		c.dispatch(t)
	}
}

// failDataOut ends t with CHECK CONDITION (ABORTED COMMAND, DATA PHASE ERROR 4B/00 or DATA
// OFFSET ERROR 4B/05) after a bad Data-Out; later Data-Out of t is dropped as for an unknown
// task. ERL 0 has no sequence recovery, but nothing else on the connection is wrong.
func (c *core) failDataOut(t *task, why string, asc, ascq byte) {
	c.logf(slog.LevelInfo, "bad-data-out", "bad Data-Out; failing the command", "itt", t.itt, "why", why)
	c.respond(t, scsi.CheckCondition(scsi.SenseAbortedCommand, asc, ascq))
}

// --- execution ---

func (c *core) dispatch(t *task) {
	if t.write && t.buf != nil {
		t.cmd.DataOut = (*t.buf)[:t.received]
	}
	if t.read && t.buf != nil {
		t.cmd.DataIn = (*t.buf)[:t.edtl]
	}
	c.start(t)
}

func (c *core) start(t *task) {
	t.running = true
	t.refs++
	c.act.run = append(c.act.run, t)
}

// completed is the event "a command (or device reset) the core handed out has finished".
func (c *core) completed(t *task, res scsi.Result) {
	t.running = false
	for _, w := range t.waiters {
		if w.pdu == nil {
			continue // dropped by close
		}
		if t.kind != kindSCSI && res.Status != scsi.StatusGood {
			w.pdu.hdr[offResponse] = tmrNoLUN
		}
		if w.pending--; w.pending == 0 {
			c.release(w)
		}
	}
	t.waiters = t.waiters[:0]
	if t.kind == kindSCSI && !t.aborted && !c.closed {
		c.respond(t, res)
	}
	c.unref(t) // the execution's reference
}

// respond queues Data-In (status collapsed into the last one when possible) and/or the SCSI
// Response, and takes t out of the task map (freeing its window slot, so MaxCmdSN moves).
func (c *core) respond(t *task, res scsi.Result) {
	c.unlistKeep(t)
	// Residuals (RFC 7143 §11.4.5): against what the CDB wanted, and for reads against what
	// was actually produced.
	var resFlags byte
	var residual uint32
	sent := uint32(0)
	if t.read && t.buf != nil {
		sent = min(uint32(max(res.DataInLen, 0)), t.edtl)
	}
	switch {
	case res.Wanted > t.edtl:
		resFlags, residual = flagResidualOverflow, res.Wanted-t.edtl
	case t.read && sent < t.edtl:
		resFlags, residual = flagResidualUnderflow, t.edtl-sent
	case !t.read && res.Wanted < t.edtl:
		resFlags, residual = flagResidualUnderflow, t.edtl-res.Wanted
	}
	collapse := res.Status == scsi.StatusGood && len(res.Sense) == 0
	if !collapse && scsi.IsSpaceAllocationFailure(res.Sense) {
		c.logf(slog.LevelWarn, "pool-full", "write refused: the volume pool is out of space (SPACE ALLOCATION FAILED)",
			"lun", t.cmd.LUN)
	}
	c.counts.commands++
	c.counts.readBytes += uint64(sent)
	written := uint64(0)
	if t.write {
		written = uint64(t.received)
		c.counts.writtenBytes += written
	}
	if lc := c.lunCounts(t.cmd.LUN); lc != nil {
		lc.commands++
		lc.readBytes += uint64(sent)
		lc.writtenBytes += written
	}
	dataSN := uint32(0)
	if sent > 0 {
		seg := c.cfg.p.InitiatorRecvDSL
		burstLen := c.cfg.p.MaxBurstLength
		data := (*t.buf)[:sent]
		var off uint32
		for off < sent {
			// A Data-In PDU never straddles a MaxBurstLength boundary: each sequence (F
			// bit) is at most MaxBurstLength, whatever the two lengths are.
			l := min(seg, sent-off, burstLen-off%burstLen)
			end := off + l
			var fl byte
			if end == sent || end%burstLen == 0 {
				fl = flagFinal
			}
			p := c.newPDU(opDataIn, fl)
			h := p.bhs()
			binary.BigEndian.PutUint64(h[offLUN:], t.lunRaw)
			h.setU32(offITT, t.itt)
			h.setU32(offTTT, reservedTag)
			h.setU32(offDataSN, dataSN)
			h.setU32(offBufOffset, off)
			p.data = data[off:end]
			c.attach(p, t)
			sn := snNone
			if end == sent && collapse {
				h[1] |= flagStatus | resFlags
				h[offStatus] = res.Status
				h.setU32(offResidual, residual)
				sn = snAdvance
			}
			c.emit(p, sn)
			dataSN++
			off = end
		}
		if collapse {
			c.unref(t) // the map's reference, kept by unlistKeep
			return
		}
	}
	p := c.newPDU(opSCSIResp, flagFinal|resFlags)
	h := p.bhs()
	h[offResponse] = 0 // command completed at target
	h[offStatus] = res.Status
	h.setU32(offITT, t.itt)
	h.setU32(offExpDataSN, max(dataSN, t.r2tSN)) // Data-In or R2T PDUs sent
	h.setU32(offResidual, residual)
	if len(res.Sense) > 0 {
		n := copy(t.sense[2:], res.Sense)
		binary.BigEndian.PutUint16(t.sense[:2], uint16(n))
		p.data = t.sense[:2+n]
	}
	c.attach(p, t)
	c.emit(p, snAdvance)
	c.unref(t)
}

// unlistKeep takes t out of the map and frees its window slot (so MaxCmdSN moves with the
// response), handing the map's reference to the caller, who drops it once t's response PDUs
// hold their own.
func (c *core) unlistKeep(t *task) {
	t.listed = false
	delete(c.tasks, t.itt)
	if t.counted {
		t.counted = false
		c.win.done()
	}
}

// --- abort and task management ---

// abortTask stops t: none of its PDUs still queued is written and its response is dropped.
// A task collecting data is freed now; a running one when it completes. It reports whether t
// is still running (a TMF response then waits for it).
func (c *core) abortTask(t *task) (running bool) {
	t.aborted = true
	kept := c.act.send[:0]
	for _, p := range c.act.send {
		if p.t == t {
			c.sendBytes -= int64(len(p.data))
			c.dropPDU(p)
			continue
		}
		kept = append(kept, p)
	}
	clear(c.act.send[len(kept):])
	c.act.send = kept
	running = t.running
	c.unlist(t)
	return running
}

// abortWhere aborts every listed task that match accepts (nil: all) and makes w wait for those
// still running.
func (c *core) abortWhere(match func(*task) bool, w *waiter) {
	var victims []*task
	for _, t := range c.tasks {
		if match == nil || match(t) {
			victims = append(victims, t)
		}
	}
	for _, t := range victims {
		if c.abortTask(t) {
			c.waitFor(t, w)
		}
	}
}

func (c *core) waitFor(t *task, w *waiter) {
	if w == nil {
		return
	}
	t.waiters = append(t.waiters, w)
	w.pending++
}

const (
	tmfAbortTask       = 1
	tmfAbortTaskSet    = 2
	tmfClearACA        = 3
	tmfClearTaskSet    = 4
	tmfLUNReset        = 5
	tmfTargetWarmReset = 6
	tmfTargetColdReset = 7
	tmfTaskReassign    = 8
	tmrComplete        = 0
	tmrNoTask          = 1
	tmrNoLUN           = 2
	tmrReassignNotSupp = 4
	tmrFunctionNotSupp = 5
)

var tmfNames = map[byte]string{
	tmfAbortTask: "abort task", tmfAbortTaskSet: "abort task set", tmfClearACA: "clear ACA",
	tmfClearTaskSet: "clear task set", tmfLUNReset: "LUN reset", tmfTargetWarmReset: "target warm reset",
	tmfTargetColdReset: "target cold reset", tmfTaskReassign: "task reassign",
}

func (c *core) tmf(h *bhs) {
	fn := h.flags() & 0x7f
	lunRaw := h.lunRaw()
	onLUN := func(t *task) bool { return t.lunRaw == lunRaw }
	p := c.newPDU(opTMFResp, flagFinal)
	p.bhs().setU32(offITT, h.itt())
	w := &waiter{pdu: p}
	response := byte(tmrComplete)
	switch fn {
	case tmfAbortTask:
		t := c.tasks[h.u32(offRTT)]
		if t == nil || t.lunRaw != lunRaw {
			response = tmrNoTask
		} else if c.abortTask(t) {
			c.waitFor(t, w)
		}
	case tmfAbortTaskSet, tmfClearTaskSet:
		c.abortWhere(onLUN, w)
	case tmfLUNReset:
		c.abortWhere(onLUN, w)
		c.deviceReset(kindLUNReset, lunRaw, w)
	case tmfTargetWarmReset:
		c.abortWhere(nil, w)
		c.deviceReset(kindTargetReset, 0, w)
	case tmfTaskReassign:
		response = tmrReassignNotSupp
	default:
		response = tmrFunctionNotSupp
	}
	p.hdr[offResponse] = response
	name := tmfNames[fn]
	if name == "" {
		name = fmt.Sprintf("function %d", fn)
	}
	c.logf(slog.LevelInfo, "", "task management", "function", name, "lun", scsi.DecodeLUN(lunRaw),
		"response", response, "waits_for", w.pending)
	c.hold(w)
}

// deviceReset runs device work (a LUN or target reset, a nexus loss) like a command; w's
// response waits for it.
func (c *core) deviceReset(kind taskKind, lunRaw uint64, w *waiter) {
	t := c.newTask()
	t.kind, t.lunRaw = kind, lunRaw
	t.cmd.Nexus = &c.cfg.sess.nexus
	t.cmd.LUN = scsi.DecodeLUN(lunRaw)
	c.waitFor(t, w)
	c.start(t)
}

// --- NOP, Text, Logout ---

func (c *core) nopOut(h *bhs, rx *rxState) {
	if h.itt() == reservedTag {
		return // answer to our ping, or a ping that wants no answer
	}
	p := c.newPDU(opNopIn, flagFinal)
	rh := p.bhs()
	copy(rh[offLUN:offLUN+8], h[offLUN:offLUN+8])
	rh.setU32(offITT, h.itt())
	rh.setU32(offTTT, reservedTag)
	if rx.ctl != nil {
		// The echo is the ping's own buffer: no copy, and its bytes stay charged until the
		// echo is written.
		p.data, p.cbuf, p.ctl = *rx.ctl, rx.ctl, rx.ctlN
	}
	c.emit(p, snAdvance)
}

func (c *core) logoutRequest(h *bhs) {
	reason := h.flags() & 0x7f
	cid := binary.BigEndian.Uint16(h[offCID:])
	var response byte
	closing := true
	switch reason {
	case logoutCloseSession:
	case logoutCloseConnection: // only this one exists (MaxConnections=1)
		if cid != c.cfg.sess.cid {
			response, closing = logoutCIDNotFound, false
		}
	case logoutRemoveForRecovery:
		response, closing = logoutRecoveryNotSupported, false // ERL 0
	default:
		c.reject(h, rejectInvalidField)
		return
	}
	p := c.newPDU(opLogoutResp, flagFinal)
	rh := p.bhs()
	rh[offResponse] = response
	rh.setU32(offITT, h.itt())
	binary.BigEndian.PutUint16(rh[offTime2Wait:], uint16(c.cfg.p.DefaultTime2Wait))
	binary.BigEndian.PutUint16(rh[offTime2Retain:], uint16(c.cfg.p.DefaultTime2Retain))
	w := &waiter{pdu: p, end: closing}
	if closing {
		c.logf(sessionLogLevel(c.cfg.sess.discovery), "", "logout", "reason", reason)
		c.logout = true
		c.abortWhere(nil, w)
		if !c.cfg.sess.discovery {
			// The initiator may use another session the moment it reads the response:
			// what this nexus held (an SPC-2 reservation) must be gone by then, not when
			// the connection is torn down afterwards.
			c.deviceReset(kindNexusLoss, 0, w)
		}
	}
	c.hold(w)
}

// textState is a Text exchange in progress.
type textState struct {
	itt     uint32
	partial []byte // request text received with the C bit
	pending []byte // answer bytes still to send (long SendTargets)
	held    int64  // ledger bytes of partial and pending
	final   bool   // pending holds a complete answer
	ttt     uint32
}

// resetText ends the text exchange in progress, giving back what it held.
func (c *core) resetText() {
	c.give(resBytes, c.text.held)
	c.text = textState{}
}

func (c *core) textRequest(h *bhs, data []byte) {
	itt, ttt := h.itt(), h.u32(offTTT)
	ts := &c.text
	if len(ts.pending) > 0 && itt == ts.itt && ttt == ts.ttt && len(data) == 0 {
		c.sendTextChunk(h) // initiator asks for the next part of a long answer
		return
	}
	if ts.itt != itt || len(ts.pending) > 0 {
		c.resetText() // a new exchange replaces an unfinished one
		ts.itt = itt
	}
	if len(ts.partial)+len(data) > maxLoginData {
		c.protocolError(h, rejectProtocol, "text request too long")
		return
	}
	if c.take(resBytes, int64(len(data))) != granted {
		c.resetText()
		c.reject(h, rejectOutOfResources)
		return
	}
	ts.held += int64(len(data))
	ts.partial = append(ts.partial, data...)
	if h.flags()&flagContinue != 0 {
		// More request text follows: acknowledge with an empty, non-final response.
		c.sendTextChunk(h)
		return
	}
	kvs, _, err := parseTextKeys(ts.partial, false)
	c.resetText()
	ts.itt = itt
	if err != nil {
		c.reject(h, rejectProtocol)
		return
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
	ans := appendTextKeys(nil, out)
	if c.take(resBytes, int64(len(ans))) != granted {
		c.reject(h, rejectOutOfResources)
		return
	}
	ts.pending, ts.held, ts.final = ans, int64(len(ans)), true
	c.sendTextChunk(h)
}

// sendTextChunk sends the next part of the pending text answer (empty while request text is
// still arriving), split at the initiator's MaxRecvDataSegmentLength with the C bit.
func (c *core) sendTextChunk(h *bhs) {
	ts := &c.text
	chunk := ts.pending
	more := false
	if lim := int(c.cfg.p.InitiatorRecvDSL); len(chunk) > lim {
		chunk, more = chunk[:lim], true
	}
	ts.pending = ts.pending[len(chunk):]
	p := c.newPDU(opTextResp, 0)
	rh := p.bhs()
	copy(rh[offLUN:offLUN+8], h[offLUN:offLUN+8])
	rh.setU32(offITT, h.itt())
	p.data = chunk
	if ts.final && !more {
		rh[1] = flagFinal
		rh.setU32(offTTT, reservedTag)
		// The answer stays charged until its last part is written.
		p.ctl = ts.held
		itt := ts.itt
		*ts = textState{itt: itt}
	} else {
		if more {
			rh[1] = flagContinue
		}
		ts.ttt = c.nextTTT() | 0x80000000
		rh.setU32(offTTT, ts.ttt)
	}
	c.emit(p, snAdvance)
}

// sendTargets lists the tenant's targets this initiator may log in to, at the portal the
// initiator dialled.
func (c *core) sendTargets(which string) []textKV {
	addr := c.cfg.portal
	var out []textKV
	emit := func(tg *Target) {
		if tg.closed.Load() {
			return
		}
		out = append(out, textKV{"TargetName", tg.cfg.IQN}, textKV{"TargetAddress", addr + "," + tpgtString})
	}
	ss := c.cfg.sess
	switch which {
	case "All":
		if !ss.discovery {
			// In a normal session only the session's target is reported (RFC 7143 §13.3).
			emit(ss.tg)
			break
		}
		for _, tg := range c.cfg.tenant.targets() {
			if tg.allows(ss.key.initiator) {
				emit(tg)
			}
		}
	case "":
		if ss.tg != nil {
			emit(ss.tg)
		}
	default:
		if tg := c.cfg.tenant.find(which); tg != nil && tg.allows(ss.key.initiator) {
			emit(tg)
		}
	}
	return out
}

// lunCounts returns the session's counters of lun, made on first use, or nil for a LUN the
// target does not have (REPORT LUNS to LUN 0 of a target without one, say).
func (c *core) lunCounts(lun uint64) *lunCounts {
	if lc := c.luns[lun]; lc != nil {
		return lc
	}
	tg := c.cfg.sess.tg
	if tg == nil || tg.stats()[lun] == nil {
		return nil
	}
	if c.luns == nil {
		c.luns = make(map[uint64]*lunCounts)
	}
	lc := new(lunCounts)
	c.luns[lun] = lc
	return lc
}
