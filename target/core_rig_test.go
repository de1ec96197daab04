package target

import (
	"encoding/binary"
	"io"
	"log/slog"
	"testing"

	"nstarget/target/scsi"
)

// coreRig drives a session core with events the way the edge does, but by hand: no socket, no
// goroutine, no clock. PDUs the core queues are "written" when the test says so (send), and
// commands it hands out run when the test says so (runAll, or at once with autoRun).
type coreRig struct {
	t      *testing.T
	srv    *Server
	tenant *Tenant
	dev    *ramDevice
	tg     *Target
	c      *core

	autoRun  bool // run and complete every handed-out command at once
	autoSend bool // write everything queued after every event
	running  []*task
	wire     []*frame // written PDUs not yet looked at

	cmdSN, itt uint32
}

type rigOption func(*rigConfig)

type rigConfig struct {
	opts   Options
	params params
	limits Limits
	disc   bool
}

func withParams(f func(*params)) rigOption   { return func(r *rigConfig) { f(&r.params) } }
func withOptions(f func(*Options)) rigOption { return func(r *rigConfig) { f(&r.opts) } }
func withLimits(l Limits) rigOption          { return func(r *rigConfig) { r.limits = l } }
func discoverySession() rigOption            { return func(r *rigConfig) { r.disc = true } }

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newCoreRig(t testing.TB, opt ...rigOption) *coreRig {
	var rc rigConfig
	rc.opts.Logger = quietLogger()
	rc.opts.MaxConnections = 1024
	rc.params = defaultParams(DefaultPolicy().MaxRecvDataSegmentLength)
	rc.params.InitiatorRecvDSL = 64 << 10
	rc.params.MaxBurstLength = 256 << 10
	rc.params.FirstBurstLength = 64 << 10
	rc.params.InitialR2T = false
	rc.params.MaxOutstandingR2T = 2
	for _, o := range opt {
		o(&rc)
	}
	srv := NewServer(rc.opts)
	return newCoreRigOn(t, srv, "rig", rc)
}

// newCoreRigOn makes a rig for a new tenant of srv (several rigs share a server to test
// fairness between tenants).
func newCoreRigOn(t testing.TB, srv *Server, tenant string, rc rigConfig) *coreRig {
	tt, _ := t.(*testing.T)
	dev := newRAMDevice(4 << 20)
	tg := newTarget(TargetConfig{IQN: "iqn.2026-01.test.nstarget:" + tenant}, dev)
	tn := srv.NewTenant(tenant, rc.limits)
	tn.Targets = []*Target{tg}
	ss := &session{discovery: rc.disc, tg: tg, cid: 7,
		key:   sessionKey{tg: tg, initiator: "iqn.2026-01.test:ini", isid: [6]byte{0x80, 0, 0, 0, 0, 1}},
		nexus: scsi.Nexus{ID: srv.nextNexus.Add(1), InitiatorName: "iqn.2026-01.test:ini", TargetName: tg.cfg.IQN}}
	if rc.disc {
		ss.tg = nil
	}
	o := srv.opts
	c := newCore(coreConfig{
		p: rc.params, sess: ss, tenant: tn, led: srv.ledger, bufs: &srv.bufs,
		portal: "10.0.0.1:3260", depth: uint32(o.QueueDepth), statSN: 1000, expCmdSN: 1,
		connBytes: connBufBudget, nopEvery: 1, nopTimeout: 3, stallTicks: 3,
	})
	return &coreRig{t: tt, srv: srv, tenant: tn, dev: dev, tg: tg, c: c, autoRun: true, autoSend: true, cmdSN: 1}
}

// pdu feeds one PDU (header, then its data into wherever the core lands it) and carries out
// the actions as the edge would. It returns the landing for tests of back-pressure.
func (r *coreRig) pdu(h *bhs, ahs, data []byte) landing {
	h.setDataLen(len(data))
	l := r.c.header(h, ahs)
	r.after()
	if l.wait {
		return l
	}
	switch {
	case l.buf != nil:
		if len(l.buf) != len(data) {
			r.t.Fatalf("landing of %d bytes for %d bytes of data", len(l.buf), len(data))
		}
		copy(l.buf, data)
	case l.skip != len(data) && len(data) > 0:
		r.t.Fatalf("landing skips %d of %d bytes", l.skip, len(data))
	}
	r.c.data(true)
	r.after()
	return l
}

// after carries out actions: logs are dropped, commands run (autoRun) or wait, PDUs are
// written (autoSend) or stay queued.
func (r *coreRig) after() {
	a := r.c.ready()
	r.running = append(r.running, a.run...)
	r.c.advance()
	if r.autoRun {
		r.runAll()
	}
	if r.autoSend {
		r.send()
	}
}

// runAll executes and completes every command handed out so far, in order.
func (r *coreRig) runAll() {
	for len(r.running) > 0 {
		t := r.running[0]
		r.running = r.running[1:]
		r.complete(t, r.execute(t))
	}
}

func (r *coreRig) execute(t *task) scsi.Result {
	switch t.kind {
	case kindLUNReset:
		r.dev.LUNReset(t.cmd.LUN, t.cmd.Nexus)
		return scsi.Result{}
	case kindTargetReset:
		r.dev.TargetReset(t.cmd.Nexus)
		return scsi.Result{}
	case kindNexusLoss:
		r.dev.NexusLoss(t.cmd.Nexus)
		return scsi.Result{}
	}
	return r.dev.Execute(&t.cmd)
}

func (r *coreRig) complete(t *task, res scsi.Result) {
	r.c.completed(t, res)
	a := r.c.ready()
	if len(a.run) > 0 {
		r.t.Fatal("completion handed out commands")
	}
	r.c.advance()
	if r.autoSend {
		r.send()
	}
}

// send writes everything queued: the PDUs land on the "wire" for recv.
func (r *coreRig) send() {
	batch := r.c.takeSend(nil)
	for _, p := range batch {
		f := &frame{BHS: *p.bhs(), Data: append([]byte(nil), p.data...)}
		if f.BHS.dataLen() != len(f.Data) {
			r.t.Fatalf("PDU 0x%02x says %d data bytes, carries %d", f.BHS.opcode(), f.BHS.dataLen(), len(f.Data))
		}
		r.wire = append(r.wire, f)
	}
	r.c.sent(batch)
}

func (r *coreRig) tick(n int) {
	for range n {
		r.c.tick()
		r.after()
	}
}

// recv returns the next written PDU, failing if there is none.
func (r *coreRig) recv() *frame {
	r.t.Helper()
	if len(r.wire) == 0 {
		r.t.Fatal("no PDU was written")
	}
	f := r.wire[0]
	r.wire = r.wire[1:]
	return f
}

func (r *coreRig) expectNothing() {
	r.t.Helper()
	if len(r.wire) > 0 {
		r.t.Fatalf("unexpected PDU 0x%02x (ITT 0x%x)", r.wire[0].BHS.opcode(), r.wire[0].BHS.itt())
	}
}

func (r *coreRig) expectOp(op byte) *frame {
	r.t.Helper()
	f := r.recv()
	if f.BHS.opcode() != op {
		r.t.Fatalf("PDU opcode 0x%02x, want 0x%02x", f.BHS.opcode(), op)
	}
	return f
}

// --- initiator PDUs ---

func (r *coreRig) command(cdb []byte, edtl uint32, read, write, final, immediate bool) *bhs {
	r.itt++
	h := new(bhs)
	*h = scsiCmdHeader(r.itt, edtl, r.cmdSN, rwFlags(read, write, final), cdb)
	if immediate {
		h[0] |= flagImmediate
	}
	if !immediate {
		r.cmdSN++
	}
	return h
}

func (r *coreRig) scsi(cdb []byte, edtl uint32, read, write bool, imm []byte, final bool) uint32 {
	r.pdu(r.command(cdb, edtl, read, write, final, false), nil, imm)
	return r.itt
}

func dataOutHeader(itt, ttt, dataSN, off uint32, final bool) *bhs {
	h := new(bhs)
	h[0] = opDataOut
	if final {
		h[1] = flagFinal
	}
	h.setU32(offITT, itt)
	h.setU32(offTTT, ttt)
	h.setU32(offDataSN, dataSN)
	h.setU32(offBufOffset, off)
	return h
}

func (r *coreRig) nopOut(itt uint32, immediate bool, data []byte) landing {
	h := new(bhs)
	h[0] = opNopOut
	if immediate {
		h[0] |= flagImmediate
	}
	h[1] = flagFinal
	h.setU32(offITT, itt)
	h.setU32(offTTT, reservedTag)
	h.setU32(offCmdSN, r.cmdSN)
	if !immediate {
		r.cmdSN++
	}
	return r.pdu(h, nil, data)
}

func (r *coreRig) tmf(fn byte, rtt uint32) {
	r.itt++
	h := new(bhs)
	h[0] = opTMFReq | flagImmediate
	h[1] = flagFinal | fn
	h.setU32(offITT, r.itt)
	h.setU32(offRTT, rtt)
	h.setU32(offCmdSN, r.cmdSN)
	r.pdu(h, nil, nil)
}

func (r *coreRig) logout(reason byte) {
	r.itt++
	h := new(bhs)
	h[0] = opLogoutReq | flagImmediate
	h[1] = flagFinal | reason
	h.setU32(offITT, r.itt)
	binary.BigEndian.PutUint16(h[offCID:], 7)
	h.setU32(offCmdSN, r.cmdSN)
	r.pdu(h, nil, nil)
}

func (r *coreRig) text(itt, ttt uint32, cont bool, data []byte) {
	h := new(bhs)
	h[0] = opTextReq | flagImmediate
	if cont {
		h[1] = flagContinue
	} else {
		h[1] = flagFinal
	}
	h.setU32(offITT, itt)
	h.setU32(offTTT, ttt)
	h.setU32(offCmdSN, r.cmdSN)
	r.pdu(h, nil, data)
}

// --- the invariant ---

// closeAndCheck closes the core, completes every command still out and writes every PDU
// still queued, then asserts that the connection, its tenant and the server hold nothing.
func (r *coreRig) closeAndCheck() {
	r.t.Helper()
	r.closeAndDrain()
	r.checkEmpty()
}

// closeAndDrain closes the core and lets everything it handed out come back.
func (r *coreRig) closeAndDrain() {
	r.c.close()
	r.c.advance()
	r.runAll()
	r.send()
}

func (r *coreRig) checkEmpty() {
	r.t.Helper()
	if !r.c.heldNothing() {
		r.t.Fatalf("core still holds: held=%v tasks=%d inflight=%d queued=%d ctl=%d imm=%d waiters=%d",
			r.c.held, len(r.c.tasks), r.c.inflight, len(r.c.act.send), r.c.ctlBytes, r.c.imm, len(r.c.waiters))
	}
	if u := usageOf(&r.tenant.acct.used); u != (Usage{}) {
		r.t.Fatalf("tenant still holds %+v", u)
	}
	if u := usageOf(&r.srv.ledger.used); u != (Usage{}) {
		r.t.Fatalf("server still holds %+v", u)
	}
}
