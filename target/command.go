package target

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

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

// task is one SCSI command. Until dispatch its data-out state belongs to the reader goroutine;
// after dispatch it belongs to its executor goroutine; the writer recycles it after its last PDU.
type task struct {
	itt       uint32
	lunRaw    uint64
	edtl      uint32
	read      bool
	write     bool
	counted   bool // holds a CmdSN window slot
	immediate bool // counted in immInflight
	buf       *[]byte
	cmd       scsi.Command
	cdb       [maxCDBLen]byte

	received uint32
	unsol    burst
	hasUnsol bool
	bursts   []burst
	r2tNext  uint32
	r2tSN    uint32
	running  bool

	aborted atomic.Bool
	sense   [2 + 252]byte
}

var taskPool = sync.Pool{New: func() any { return &task{bursts: make([]burst, 0, 8)} }}

func (c *conn) recycle(t *task) {
	c.releaseResources(t)
	t.cmd = scsi.Command{}
	taskPool.Put(t)
}

func (c *conn) nextTag() uint32 {
	c.nextTTT++
	if c.nextTTT == reservedTag {
		c.nextTTT = 1
	}
	return c.nextTTT
}

func (c *conn) handleCommand(h *bhs, ahs []byte) error {
	n := h.dataLen()
	fl := h.flags()
	edtl := h.u32(offTTT)
	if !c.sess.accept(h.u32(offCmdSN), h.immediate()) {
		// Outside the window: silently ignored (RFC 7143 §4.2.2.1), data included.
		return c.pr.discard(n)
	}
	t := taskPool.Get().(*task)
	t.itt = h.itt()
	t.lunRaw = h.lunRaw()
	t.edtl = edtl
	t.read = fl&flagRead != 0
	t.write = fl&flagWrite != 0
	t.counted = !h.immediate()
	t.immediate = false // set once counted in immInflight
	t.received, t.hasUnsol, t.bursts, t.r2tNext, t.r2tSN, t.running = 0, false, t.bursts[:0], 0, 0, false
	t.aborted.Store(false)
	cdb, err := cdbFromPDU(h, ahs, t.cdb[:])
	if err != nil {
		c.finishEarly(t)
		return &protoError{rejectProtocol, err.Error()}
	}
	t.cmd = scsi.Command{Nexus: &c.sess.nexus, LUN: decodeLUN(t.lunRaw), CDB: cdb, Tag: t.itt, ExpectedLen: edtl}

	if n > 0 && (!t.write || !c.params.ImmediateData || uint32(n) > edtl ||
		uint32(n) > c.params.TargetRecvDSL || uint32(n) > c.params.FirstBurstLength) {
		c.finishEarly(t)
		return &protoError{rejectProtocol, fmt.Sprintf("bad immediate data (%d bytes, edtl %d)", n, edtl)}
	}
	if edtl > maxTransfer || (t.read && t.write) {
		// Refused without touching memory: a status, not a dropped connection.
		if err := c.pr.discard(n); err != nil {
			return err
		}
		c.respond(t, scsi.Result{Status: scsi.StatusCheckCondition, Sense: invalidCDBSense[:]})
		return nil
	}
	if h.immediate() && c.immInflight.Load() >= maxImmediate {
		// Immediate commands bypass the CmdSN window; bound them separately (§11.17.1).
		if err := c.pr.discard(n); err != nil {
			return err
		}
		taskPool.Put(t)
		c.reject(h, rejectImmediate)
		return nil
	}
	if (t.read || t.write) && edtl > 0 {
		if !c.reserveBuf(int64(edtl)) {
			// Too much data in flight on this connection or in the whole server: TASK SET
			// FULL asks the initiator to retry later instead of letting tenants pin
			// unbounded memory.
			if err := c.pr.discard(n); err != nil {
				return err
			}
			c.respond(t, scsi.Result{Status: scsi.StatusTaskSetFull})
			return nil
		}
		t.buf = c.srv.bufs.get(int(edtl))
	}
	if h.immediate() {
		t.immediate = true
		c.immInflight.Add(1)
	}
	if n > 0 {
		if err := c.pr.readData((*t.buf)[:n]); err != nil {
			c.finishEarly(t)
			return c.dataErr(h, err)
		}
	}
	t.received = uint32(n)
	c.tmu.Lock()
	if _, dup := c.tasks[t.itt]; dup {
		c.tmu.Unlock()
		c.finishEarly(t)
		c.reject(h, rejectTaskInProgress)
		return nil
	}
	c.tasks[t.itt] = t
	c.tmu.Unlock()

	if !t.write || t.received >= edtl {
		c.dispatch(t)
		return nil
	}
	t.r2tNext = t.received
	if !c.params.InitialR2T && fl&flagFinal == 0 {
		end := min(c.params.FirstBurstLength, edtl)
		if end > t.received {
			t.hasUnsol = true
			t.unsol = burst{ttt: reservedTag, offset: t.received, length: end - t.received}
			t.r2tNext = end
		}
	}
	c.issueR2Ts(t)
	return nil
}

// reserveBuf accounts n data-buffer bytes against the connection's and the server's budgets.
func (c *conn) reserveBuf(n int64) bool {
	if c.bufBytes.Add(n) > connBufBudget {
		c.bufBytes.Add(-n)
		return false
	}
	if c.srv.bufBytes.Add(n) > c.srv.bufBudget {
		c.srv.bufBytes.Add(-n)
		c.bufBytes.Add(-n)
		return false
	}
	return true
}

// finishEarly drops a task that never got a window slot released or a response.
func (c *conn) finishEarly(t *task) {
	if t.counted {
		c.sess.done()
	}
	c.releaseResources(t)
	taskPool.Put(t)
}

// releaseResources returns t's buffer and its share of the connection's budgets.
func (c *conn) releaseResources(t *task) {
	if t.buf != nil {
		c.bufBytes.Add(-int64(t.edtl))
		c.srv.bufBytes.Add(-int64(t.edtl))
		c.srv.bufs.put(t.buf)
		t.buf = nil
	}
	if t.immediate {
		c.immInflight.Add(-1)
		t.immediate = false
	}
}

const (
	// connBufBudget bounds data buffers held by one connection's commands.
	connBufBudget = 256 << 20
	// serverBufBudget bounds them over all connections of a Server (all tenants).
	serverBufBudget = 2 << 30
	// maxImmediate bounds immediate (window-less) SCSI commands in flight per connection.
	maxImmediate = 16
)

// invalidCDBSense is ILLEGAL REQUEST / INVALID FIELD IN CDB (fixed format).
var invalidCDBSense = [18]byte{0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0}

// issueR2Ts keeps up to MaxOutstandingR2T bursts requested.
func (c *conn) issueR2Ts(t *task) {
	var ps [16]*outPDU
	k := 0
	for len(t.bursts) < int(c.params.MaxOutstandingR2T) && t.r2tNext < t.edtl && k < len(ps) {
		length := min(c.params.MaxBurstLength, t.edtl-t.r2tNext)
		b := burst{ttt: c.nextTag(), offset: t.r2tNext, length: length}
		t.bursts = append(t.bursts, b)
		t.r2tNext += length
		p := getOut()
		h := p.bhs()
		h[0] = opR2T
		h[1] = flagFinal
		binary.BigEndian.PutUint64(h[8:16], t.lunRaw)
		h.setU32(offITT, t.itt)
		h.setU32(offTTT, b.ttt)
		h.setU32(offDataSN, t.r2tSN)
		h.setU32(offBufOffset, b.offset)
		h.setU32(offResidual, length)
		t.r2tSN++
		p.snMode = snCarry
		p.t = t
		ps[k] = p
		k++
	}
	if k > 0 {
		c.queue(ps[:k]...)
	}
}

func (c *conn) handleDataOut(h *bhs) error {
	n := uint32(h.dataLen())
	itt := h.itt()
	c.tmu.Lock()
	t := c.tasks[itt]
	c.tmu.Unlock()
	if t == nil || t.running || !t.write {
		// Data for an aborted or finished task: drop it.
		return c.pr.discard(int(n))
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
		return c.failDataOut(t, n, dataPhaseErrorSense[:], fmt.Sprintf("Data-Out with unknown TTT 0x%x", ttt))
	}
	off := h.u32(offBufOffset)
	if h.u32(offDataSN) != b.dataSN {
		return c.failDataOut(t, n, dataPhaseErrorSense[:], fmt.Sprintf("Data-Out DataSN %d, expected %d", h.u32(offDataSN), b.dataSN))
	}
	if off != b.offset+b.got || n > b.length-b.got || n > c.params.TargetRecvDSL {
		return c.failDataOut(t, n, dataOffsetErrorSense[:], fmt.Sprintf("Data-Out offset %d len %d outside burst %d+%d/%d", off, n, b.offset, b.got, b.length))
	}
	if err := c.pr.readData((*t.buf)[off : off+n]); err != nil {
		return c.dataErr(h, err)
	}
	b.got += n
	b.dataSN++
	t.received += n
	final := h.flags()&flagFinal != 0
	if final && b.got != b.length {
		return c.failDataOut(t, 0, dataPhaseErrorSense[:], "Data-Out burst ended early")
	}
	if b.got == b.length {
		if bi < 0 {
			t.hasUnsol = false
		} else {
			t.bursts = append(t.bursts[:bi], t.bursts[bi+1:]...)
		}
		if t.received < t.edtl {
			c.issueR2Ts(t)
		}
	}
	if t.received == t.edtl {
		c.dispatch(t)
	}
	return nil
}

// Sense for a broken Data-Out sequence: ABORTED COMMAND with DATA PHASE ERROR / DATA OFFSET
// ERROR. The task ends with CHECK CONDITION and the connection lives on (ERL 0 has no
// sequence recovery, but nothing else on the connection is wrong).
var (
	dataPhaseErrorSense  = [18]byte{0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, 0x00}
	dataOffsetErrorSense = [18]byte{0x70, 0, 0x0b, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x4b, 0x05}
)

// failDataOut ends t with CHECK CONDITION after a bad Data-Out; the PDU's data (n bytes) is
// skipped and any later Data-Out of t is dropped as for an unknown task.
func (c *conn) failDataOut(t *task, n uint32, sense []byte, why string) error {
	if err := c.pr.discard(int(n)); err != nil {
		return err
	}
	c.log.Info("bad Data-Out; failing the command", "itt", t.itt, "why", why)
	t.running = true
	c.respond(t, scsi.Result{Status: scsi.StatusCheckCondition, Sense: sense})
	return nil
}

func (c *conn) dispatch(t *task) {
	t.running = true
	if t.write && t.buf != nil {
		t.cmd.DataOut = (*t.buf)[:t.received]
	}
	if t.read && t.buf != nil {
		t.cmd.DataIn = (*t.buf)[:t.edtl]
	}
	c.execs.Add(1)
	if c.lastExecNs.Load() < inlineThresholdNs && t.edtl <= inlineMaxBytes {
		// Recent commands completed fast (page cache): running this one on the reader
		// goroutine saves two goroutine handoffs, which on few cores costs more than the
		// command itself. A slow command flips the connection to one goroutine per command,
		// so a slow backend still sees concurrency.
		c.execute(t)
		return
	}
	go c.execute(t)
}

const (
	inlineThresholdNs = 150_000
	inlineMaxBytes    = 256 << 10
)

func (c *conn) execute(t *task) {
	defer c.execs.Done()
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("panic executing SCSI command; closing connection", "panic", r,
				"cdb", fmt.Sprintf("% x", t.cmd.CDB), "stack", string(debug.Stack()))
			c.kill() // the reader (maybe this very goroutine) then fails on the closed socket
		}
	}()
	start := time.Now()
	res := c.sess.tg.dev.Execute(&t.cmd)
	c.lastExecNs.Store(int64(time.Since(start)))
	c.respond(t, res)
}

// respond queues Data-In (phase-collapsed status when possible) and/or the SCSI Response.
func (c *conn) respond(t *task, res scsi.Result) {
	c.tmu.Lock()
	if c.tasks[t.itt] == t {
		delete(c.tasks, t.itt)
	}
	c.tmu.Unlock()
	if t.counted {
		c.sess.done()
	}
	// Residuals (RFC 7143 §11.4.5): against what the CDB wanted, and for reads against what
	// was actually produced.
	var resFlags byte
	var residual uint32
	sent := uint32(0)
	if t.read {
		sent = min(uint32(max(res.DataInLen, 0)), t.edtl)
	}
	switch {
	case res.Wanted > t.edtl:
		resFlags, residual = 0x04, res.Wanted-t.edtl
	case t.read && sent < t.edtl:
		resFlags, residual = 0x02, t.edtl-sent
	case !t.read && res.Wanted < t.edtl:
		resFlags, residual = 0x02, t.edtl-res.Wanted
	}
	collapse := res.Status == scsi.StatusGood && len(res.Sense) == 0

	var ps [64]*outPDU
	all := ps[:0]
	if sent > 0 {
		seg := c.params.InitiatorRecvDSL
		burstLen := c.params.MaxBurstLength
		data := (*t.buf)[:sent]
		var dataSN, off uint32
		for off < sent {
			// A Data-In PDU never straddles a MaxBurstLength boundary: each sequence (F
			// bit) is at most MaxBurstLength, whatever the two lengths are.
			l := min(seg, sent-off, burstLen-off%burstLen)
			p := getOut()
			h := p.bhs()
			h[0] = opDataIn
			end := off + l
			if end == sent || (end%burstLen == 0) {
				h[1] = flagFinal
			}
			binary.BigEndian.PutUint64(h[8:16], t.lunRaw)
			h.setU32(offITT, t.itt)
			h.setU32(offTTT, reservedTag)
			h.setU32(offDataSN, dataSN)
			h.setU32(offBufOffset, off)
			p.data = data[off:end]
			p.t = t
			if end == sent && collapse {
				h[1] |= 0x01 | resFlags
				h[3] = res.Status
				h.setU32(offResidual, residual)
				p.snMode = snAdvance
				p.last = true
			}
			dataSN++
			off = end
			all = append(all, p)
			if len(all) == cap(all) {
				c.queue(all...)
				all = ps[:0]
			}
		}
		if collapse {
			// The status went out in the last Data-In (which may have filled and
			// queued the batch already).
			if len(all) > 0 {
				c.queue(all...)
			}
			return
		}
		t.r2tSN = dataSN
	}
	p := getOut()
	h := p.bhs()
	h[0] = opSCSIResp
	h[1] = flagFinal | resFlags
	h[2] = 0 // command completed at target
	h[3] = res.Status
	h.setU32(offITT, t.itt)
	h.setU32(offDataSN, t.r2tSN) // ExpDataSN: Data-In or R2T PDUs sent
	h.setU32(offResidual, residual)
	if len(res.Sense) > 0 {
		n := copy(t.sense[2:], res.Sense)
		binary.BigEndian.PutUint16(t.sense[:2], uint16(n))
		p.data = t.sense[:2+n]
	}
	p.snMode = snAdvance
	p.t = t
	p.last = true
	all = append(all, p)
	c.queue(all...)
}

// --- task management ---

const (
	tmfAbortTask        = 1
	tmfAbortTaskSet     = 2
	tmfClearACA         = 3
	tmfClearTaskSet     = 4
	tmfLUNReset         = 5
	tmfTargetWarmReset  = 6
	tmfTargetColdReset  = 7
	tmfTaskReassign     = 8
	tmrComplete         = 0
	tmrNoTask           = 1
	tmrNoLUN            = 2
	tmrReassignNotSupp  = 4
	tmrFunctionNotSupp  = 5
	tmrFunctionRejected = 255
)

func (c *conn) handleTMF(h *bhs) error {
	if err := c.pr.discard(h.dataLen()); err != nil {
		return err
	}
	if !c.acceptInstant(h) {
		return nil
	}
	fn := h.flags() & 0x7f
	lunRaw := h.lunRaw()
	lun := decodeLUN(lunRaw)
	onLUN := func(t *task) bool { return t.lunRaw == lunRaw }
	response := byte(tmrComplete)
	running := false // an aborted task is still executing
	switch fn {
	case tmfAbortTask:
		rtt := h.u32(offTTT)
		c.tmu.Lock()
		t := c.tasks[rtt]
		c.tmu.Unlock()
		if t == nil || t.lunRaw != lunRaw {
			response = tmrNoTask
		} else {
			running = c.abort(t)
		}
	case tmfAbortTaskSet, tmfClearTaskSet:
		running = c.abortAll(onLUN)
	case tmfLUNReset:
		running = c.abortAll(onLUN)
		if err := c.sess.tg.dev.LUNReset(lun, &c.sess.nexus); err != nil {
			response = tmrNoLUN
		}
	case tmfTargetWarmReset:
		running = c.abortAll(nil)
		c.sess.tg.dev.TargetReset(&c.sess.nexus)
	case tmfTaskReassign:
		response = tmrReassignNotSupp
	default:
		response = tmrFunctionNotSupp
	}
	if running {
		// RFC 7143 §4.2.3.3: the TMF response means the aborted tasks are over; a WRITE
		// still executing could otherwise land after the initiator retried or moved on.
		c.execs.Wait()
	}
	p := getOut()
	rh := p.bhs()
	rh[0] = opTMFResp
	rh[1] = flagFinal
	rh[2] = response
	rh.setU32(offITT, h.itt())
	p.snMode = snAdvance
	c.queue1(p)
	return nil
}

// abort stops t: no further PDU of it is written. A task still collecting data is released
// here; a running one finishes in its goroutine and its response is dropped by the writer.
// It reports whether t was running (the caller waits for it before answering the TMF).
func (c *conn) abort(t *task) (running bool) {
	c.tmu.Lock()
	if c.tasks[t.itt] != t {
		c.tmu.Unlock()
		return false
	}
	delete(c.tasks, t.itt)
	// Set before unlocking: respond() has not passed its map check yet, so every PDU it
	// queues is suppressed, and the writer cannot have recycled t under us.
	t.aborted.Store(true)
	running, counted := t.running, t.counted
	c.tmu.Unlock()
	if running {
		// respond() will not find it in the map but still frees the window slot.
		return true
	}
	if counted {
		c.sess.done()
	}
	// Recycle through the writer so queued R2Ts referencing t are dropped first.
	p := getOut()
	p.skip = true
	p.t = t
	p.last = true
	c.queue1(p)
	return false
}

func (c *conn) abortAll(match func(*task) bool) (running bool) {
	c.tmu.Lock()
	var victims []*task
	for _, t := range c.tasks {
		if match == nil || match(t) {
			victims = append(victims, t)
		}
	}
	c.tmu.Unlock()
	for _, t := range victims {
		if c.abort(t) {
			running = true
		}
	}
	return running
}
