package target

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"nstarget/target/scsi"
)

func cdb10(op byte, lba uint32, blocks uint16) []byte {
	c := make([]byte, 10)
	c[0] = op
	binary.BigEndian.PutUint32(c[2:], lba)
	binary.BigEndian.PutUint16(c[7:], blocks)
	return c
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	return b
}

func TestCoreNopOutWithImmediateBitDoesNotAdvanceCmdSN(t *testing.T) {
	r := newCoreRig(t)
	start := r.cmdSN
	for i := range 3 {
		r.nopOut(100+uint32(i), true, []byte("ping"))
		f := r.expectOp(opNopIn)
		if f.BHS.itt() != 100+uint32(i) || string(f.Data) != "ping" || f.BHS.u32(offExpCmdSN) != start {
			t.Fatalf("NOP-In itt %d data %q ExpCmdSN %d (want %d)", f.BHS.itt(), f.Data, f.BHS.u32(offExpCmdSN), start)
		}
	}
	r.scsi([]byte{0}, 0, false, false, nil, true)
	if f := r.expectOp(opSCSIResp); f.BHS[offStatus] != 0 || f.BHS.u32(offExpCmdSN) != start+1 {
		t.Fatalf("TUR after pings: status %d ExpCmdSN %d", f.BHS[offStatus], f.BHS.u32(offExpCmdSN))
	}
	r.nopOut(200, false, nil)
	if f := r.expectOp(opNopIn); f.BHS.u32(offExpCmdSN) != start+2 {
		t.Fatalf("non-immediate NOP-Out: ExpCmdSN %d, want %d", f.BHS.u32(offExpCmdSN), start+2)
	}
	r.closeAndCheck()
}

func TestCoreCommandOutsideWindowIsSilentlyIgnored(t *testing.T) {
	r := newCoreRig(t, withOptions(func(o *Options) { o.QueueDepth = 4 }))
	good := r.cmdSN
	for _, sn := range []uint32{good + 4, good - 1} {
		r.cmdSN = sn
		r.scsi([]byte{0}, 0, false, false, nil, true)
	}
	r.expectNothing()
	r.cmdSN = good
	r.scsi([]byte{0}, 0, false, false, nil, true)
	if f := r.expectOp(opSCSIResp); f.BHS[offStatus] != 0 || f.BHS.u32(offMaxCmdSN) != good+4 {
		t.Fatalf("in-window command: status %d MaxCmdSN %d", f.BHS[offStatus], f.BHS.u32(offMaxCmdSN))
	}
	r.closeAndCheck()
}

func TestCoreMaxCmdSNMovesOnlyAsCommandsComplete(t *testing.T) {
	r := newCoreRig(t, withOptions(func(o *Options) { o.QueueDepth = 2 }))
	r.autoRun = false
	r.scsi([]byte{0}, 0, false, false, nil, true)
	r.scsi([]byte{0}, 0, false, false, nil, true)
	r.scsi([]byte{0}, 0, false, false, nil, true) // window full: ignored
	if len(r.running) != 2 {
		t.Fatalf("%d commands handed out, want 2", len(r.running))
	}
	r.runAll()
	a, b := r.expectOp(opSCSIResp), r.expectOp(opSCSIResp)
	if a.BHS.u32(offMaxCmdSN) != 3 || b.BHS.u32(offMaxCmdSN) != 4 {
		t.Fatalf("MaxCmdSN %d then %d, want 3 then 4", a.BHS.u32(offMaxCmdSN), b.BHS.u32(offMaxCmdSN))
	}
	r.closeAndCheck()
}

func TestCoreWriteUsesImmediateUnsolicitedAndR2TDataThenReadsBack(t *testing.T) {
	r := newCoreRig(t, withParams(func(p *params) {
		p.FirstBurstLength, p.MaxBurstLength, p.MaxOutstandingR2T = 16384, 32768, 2
	}))
	const total = 96 << 10
	data := pattern(total, 0x5a)
	itt := r.scsi(cdb10(0x2a, 8, total/512), total, false, true, data[:4096], false)
	// Unsolicited up to FirstBurstLength, in two PDUs.
	r.pdu(dataOutHeader(itt, reservedTag, 0, 4096, false), nil, data[4096:8192])
	r.pdu(dataOutHeader(itt, reservedTag, 1, 8192, true), nil, data[8192:16384])
	// Then R2Ts, at most two outstanding, each at most MaxBurstLength.
	seen := 0
	for seen < total-16384 {
		f := r.expectOp(opR2T)
		off, n := f.BHS.u32(offBufOffset), f.BHS.u32(offDesiredLen)
		if n > 32768 {
			t.Fatalf("R2T for %d bytes beyond MaxBurstLength", n)
		}
		r.pdu(dataOutHeader(itt, f.BHS.u32(offTTT), 0, off, true), nil, data[off:off+n])
		seen += int(n)
	}
	if f := r.expectOp(opSCSIResp); f.BHS[offStatus] != 0 {
		t.Fatalf("write status %d", f.BHS[offStatus])
	}
	r.scsi(cdb10(0x28, 8, total/512), total, true, false, nil, true)
	var got []byte
	for {
		f := r.expectOp(opDataIn)
		got = append(got, f.Data...)
		if f.BHS[1]&flagStatus != 0 {
			break
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatal("read back differs from what was written")
	}
	r.closeAndCheck()
}

func TestCoreReadResidualsFollowCDBAgainstExpectedLength(t *testing.T) {
	for _, tc := range []struct {
		name       string
		blocks     uint16
		edtl       uint32
		flag       byte
		residual   uint32
		dataIn     int
		withStatus bool
	}{
		{"overflow", 4, 1024, flagResidualOverflow, 1024, 1024, true},
		{"underflow", 1, 1024, flagResidualUnderflow, 512, 512, true},
		{"exact", 2, 1024, 0, 0, 1024, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newCoreRig(t)
			r.scsi(cdb10(0x28, 0, tc.blocks), tc.edtl, true, false, nil, true)
			f := r.expectOp(opDataIn)
			if len(f.Data) != tc.dataIn || f.BHS[1]&flagStatus == 0 {
				t.Fatalf("Data-In of %d bytes (S=%v), want %d with status", len(f.Data), f.BHS[1]&flagStatus != 0, tc.dataIn)
			}
			if f.BHS[1]&(flagResidualOverflow|flagResidualUnderflow) != tc.flag || f.BHS.u32(offResidual) != tc.residual {
				t.Fatalf("flags %02x residual %d, want %02x %d", f.BHS[1], f.BHS.u32(offResidual), tc.flag, tc.residual)
			}
			r.closeAndCheck()
		})
	}
}

func TestCoreDataInSequencesNeverExceedMaxBurstLength(t *testing.T) {
	r := newCoreRig(t, withParams(func(p *params) { p.InitiatorRecvDSL, p.MaxBurstLength = 24<<10, 64<<10 }))
	const n = 256 << 10
	r.scsi(cdb10(0x28, 0, n/512), n, true, false, nil, true)
	var off, seq uint32
	for {
		f := r.expectOp(opDataIn)
		if f.BHS.u32(offBufOffset) != off {
			t.Fatalf("Data-In at offset %d, want %d", f.BHS.u32(offBufOffset), off)
		}
		off += uint32(len(f.Data))
		seq += uint32(len(f.Data))
		if seq > 64<<10 {
			t.Fatalf("a Data-In sequence reached %d bytes", seq)
		}
		if f.BHS[1]&flagFinal != 0 {
			seq = 0
		}
		if f.BHS[1]&flagStatus != 0 {
			break
		}
	}
	if off != n {
		t.Fatalf("read %d bytes, want %d", off, n)
	}
	r.closeAndCheck()
}

func TestCoreBadDataOutFailsOnlyThatCommand(t *testing.T) {
	for _, tc := range []struct {
		name     string
		dataSN   uint32
		offset   uint32
		asc      byte
		ascq     byte
		wrongTTT bool
	}{
		{"wrong DataSN", 5, 0, 0x4b, 0x00, false},
		{"wrong offset", 0, 512, 0x4b, 0x05, false},
		{"unknown TTT", 0, 0, 0x4b, 0x00, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newCoreRig(t, withParams(func(p *params) { p.InitialR2T = true }))
			itt := r.scsi(cdb10(0x2a, 0, 2), 1024, false, true, nil, true)
			r2t := r.expectOp(opR2T)
			ttt := r2t.BHS.u32(offTTT)
			if tc.wrongTTT {
				ttt++
			}
			r.pdu(dataOutHeader(itt, ttt, tc.dataSN, tc.offset, true), nil, make([]byte, 512))
			f := r.expectOp(opSCSIResp)
			if f.BHS[offStatus] != scsi.StatusCheckCondition || len(f.Data) < 16 || f.Data[2+12] != tc.asc || f.Data[2+13] != tc.ascq {
				t.Fatalf("status %d sense % x", f.BHS[offStatus], f.Data)
			}
			// The connection lives on.
			r.scsi([]byte{0}, 0, false, false, nil, true)
			r.expectOp(opSCSIResp)
			r.closeAndCheck()
		})
	}
}

func TestCoreAbortTaskWaitingForDataFreesIt(t *testing.T) {
	r := newCoreRig(t, withParams(func(p *params) { p.InitialR2T = true }))
	itt := r.scsi(cdb10(0x2a, 0, 2048), 1<<20, false, true, nil, true)
	r.expectOp(opR2T)
	r.expectOp(opR2T)
	if r.tenant.acct.used[resBytes].Load() < 1<<20 {
		t.Fatal("a pending WRITE holds no buffer bytes")
	}
	r.tmf(tmfAbortTask, itt)
	if f := r.expectOp(opTMFResp); f.BHS[offResponse] != tmrComplete {
		t.Fatalf("abort response %d", f.BHS[offResponse])
	}
	if n := r.c.held[resBytes]; n != 0 {
		t.Fatalf("aborted WRITE still holds %d bytes", n)
	}
	// What the tenant is charged now is at most the connection's credit.
	if n := r.tenant.acct.used[resBytes].Load(); n > 2*creditChunk[resBytes] {
		t.Fatalf("tenant charged %d bytes after the abort", n)
	}
	// Its late Data-Out is dropped silently; an unknown task is "does not exist".
	r.pdu(dataOutHeader(itt, 1, 0, 0, true), nil, make([]byte, 512))
	r.expectNothing()
	r.tmf(tmfAbortTask, itt)
	if f := r.expectOp(opTMFResp); f.BHS[offResponse] != tmrNoTask {
		t.Fatalf("abort of unknown task: response %d", f.BHS[offResponse])
	}
	r.closeAndCheck()
}

func TestCoreAbortOfRunningCommandIsAnsweredOnlyAfterItEnds(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	itt := r.scsi(cdb10(0x2a, 0, 1), 512, false, true, make([]byte, 512), true)
	if len(r.running) != 1 {
		t.Fatal("the WRITE was not handed out")
	}
	r.tmf(tmfAbortTask, itt)
	r.expectNothing() // the TMF response waits for the running WRITE
	r.runAll()
	f := r.expectOp(opTMFResp)
	if f.BHS[offResponse] != tmrComplete {
		t.Fatalf("response %d", f.BHS[offResponse])
	}
	r.expectNothing() // the aborted WRITE's own response is dropped
	r.closeAndCheck()
}

func TestCoreLUNResetWaitsForRunningCommandsAndResetsTheDevice(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	r.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
	r.scsi(cdb10(0x28, 1, 1), 512, true, false, nil, true)
	r.tmf(tmfLUNReset, 0)
	r.expectNothing()
	r.runAll()
	if f := r.expectOp(opTMFResp); f.BHS[offResponse] != tmrComplete {
		t.Fatalf("LUN reset response %d", f.BHS[offResponse])
	}
	r.expectNothing()
	if r.dev.resets != 1 {
		t.Fatalf("device resets %d, want 1", r.dev.resets)
	}
	r.closeAndCheck()
}

func TestCoreUnsupportedTaskManagementIsAnswered(t *testing.T) {
	r := newCoreRig(t)
	r.tmf(tmfTaskReassign, 0)
	if f := r.expectOp(opTMFResp); f.BHS[offResponse] != tmrReassignNotSupp {
		t.Fatalf("task reassign: %d", f.BHS[offResponse])
	}
	r.tmf(tmfClearACA, 0)
	if f := r.expectOp(opTMFResp); f.BHS[offResponse] != tmrFunctionNotSupp {
		t.Fatalf("clear ACA: %d", f.BHS[offResponse])
	}
	r.closeAndCheck()
}

func TestCoreLogoutWaitsForRunningCommandsThenEnds(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	r.scsi(cdb10(0x2a, 0, 1), 512, false, true, make([]byte, 512), true)
	r.logout(logoutCloseSession)
	r.expectNothing()
	if r.c.act.end != endNone {
		t.Fatal("connection ends before the running command did")
	}
	r.runAll()
	f := r.expectOp(opLogoutResp)
	if f.BHS[offResponse] != 0 || r.c.act.end != endAfterSend {
		t.Fatalf("logout response %d end %d", f.BHS[offResponse], r.c.act.end)
	}
	// Nothing after the logout is taken.
	r.scsi([]byte{0}, 0, false, false, nil, true)
	r.expectNothing()
	r.closeAndCheck()
}

func TestCoreLogoutReleasesTheNexusBeforeItsResponse(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	r.logout(logoutCloseSession)
	r.expectNothing()
	if len(r.running) != 1 || r.running[0].kind != kindNexusLoss {
		t.Fatalf("logout handed out %d tasks, want the nexus loss", len(r.running))
	}
	r.runAll()
	if r.dev.losses != 1 {
		t.Fatalf("NexusLoss called %d times before the response, want 1", r.dev.losses)
	}
	r.expectOp(opLogoutResp)
	r.closeAndCheck()
}

func TestCoreLogoutOfUnknownConnectionOrForRecoveryKeepsSession(t *testing.T) {
	r := newCoreRig(t)
	r.c.cfg.sess.cid = 9
	r.logout(logoutCloseConnection)
	if f := r.expectOp(opLogoutResp); f.BHS[offResponse] != logoutCIDNotFound {
		t.Fatalf("response %d", f.BHS[offResponse])
	}
	r.logout(logoutRemoveForRecovery)
	if f := r.expectOp(opLogoutResp); f.BHS[offResponse] != logoutRecoveryNotSupported {
		t.Fatalf("response %d", f.BHS[offResponse])
	}
	r.scsi([]byte{0}, 0, false, false, nil, true)
	r.expectOp(opSCSIResp)
	r.closeAndCheck()
}

func TestCoreIdleConnectionIsPingedThenClosed(t *testing.T) {
	r := newCoreRig(t)
	r.tick(1)
	ping := r.expectOp(opNopIn)
	if ping.BHS.itt() != reservedTag || ping.BHS.u32(offTTT) == reservedTag {
		t.Fatalf("ping ITT %x TTT %x", ping.BHS.itt(), ping.BHS.u32(offTTT))
	}
	// An answer keeps it alive.
	h := new(bhs)
	h[0] = opNopOut | flagImmediate
	h[1] = flagFinal
	h.setU32(offITT, reservedTag)
	h.setU32(offTTT, ping.BHS.u32(offTTT))
	r.pdu(h, nil, nil)
	// The tick after the answer starts counting again; nopEvery+nopTimeout = 4 idle ticks.
	r.tick(4)
	if r.c.act.end != endNone {
		t.Fatal("closed although the ping was answered")
	}
	r.tick(1)
	if r.c.act.end != endNow {
		t.Fatal("not closed after nopEvery+nopTimeout ticks without an answer")
	}
	r.closeAndCheck()
}

func TestCoreStallInTheMiddleOfAPDUCountsAsIdle(t *testing.T) {
	r := newCoreRig(t)
	itt := r.itt + 1
	h := r.command(cdb10(0x2a, 0, 128), 64<<10, false, true, true, false)
	h.setDataLen(32 << 10)
	l := r.c.header(h, nil)
	r.after()
	if len(l.buf) != 32<<10 {
		t.Fatalf("landing %d bytes", len(l.buf))
	}
	// The data never comes.
	r.tick(4)
	if r.c.act.end != endNow {
		t.Fatal("a connection stalled mid-PDU was not closed")
	}
	_ = itt
	r.closeAndCheck()
}

func TestCorePeerThatDoesNotReadGetsBackPressureThenIsClosed(t *testing.T) {
	r := newCoreRig(t)
	r.autoSend = false
	ping := make([]byte, 256<<10)
	waited := false
	for i := range 64 {
		if l := r.nopOut(uint32(i+1), true, ping); l.wait {
			waited = true
			break
		}
	}
	if !waited {
		t.Fatal("64 pings of 256 KiB queued without back-pressure")
	}
	if r.c.ctlBytes > ctlQueueLimit+int64(bhsLen+len(ping)) {
		t.Fatalf("%d bytes of echoes queued, limit %d", r.c.ctlBytes, ctlQueueLimit)
	}
	// Pings are answered as a ping answer; the peer reads nothing: the writer stalls.
	r.tick(3)
	if r.c.act.end != endNow {
		t.Fatal("a peer that reads nothing was not closed")
	}
	r.closeAndCheck()
}

func TestCoreBackPressureLiftsWhenThePeerReads(t *testing.T) {
	r := newCoreRig(t)
	r.autoSend = false
	ping := make([]byte, 256<<10)
	i := uint32(0)
	for {
		i++
		if l := r.nopOut(i, true, ping); l.wait {
			break
		}
	}
	r.send()
	if l := r.nopOut(i, true, ping); l.wait {
		t.Fatal("still waiting after everything was written")
	}
	r.closeAndCheck()
}

func TestCoreAbandonedWritesGiveEverythingBackOnClose(t *testing.T) {
	// The leak that let one tenant drain the server: WRITEs waiting for Data-Out (R2T sent)
	// or reads in the middle of Data-In when the connection drops.
	r := newCoreRig(t, withParams(func(p *params) { p.InitialR2T = true }))
	for range 3 {
		r.scsi(cdb10(0x2a, 0, 8192), 4<<20, false, true, nil, true)
	}
	r.autoSend = false
	r.scsi(cdb10(0x28, 0, 4096), 2<<20, true, false, nil, true)
	if r.srv.ledger.used[resBytes].Load() < 14<<20 {
		t.Fatalf("server holds only %d bytes", r.srv.ledger.used[resBytes].Load())
	}
	// Half the read was taken for writing when the connection died.
	batch := r.c.takeSend(nil)
	r.c.close()
	r.c.sent(batch)
	r.checkEmpty()
}

func TestCoreCloseWithCommandsRunningGivesBackWhenTheyComplete(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	r.scsi(cdb10(0x28, 0, 8), 4096, true, false, nil, true)
	r.scsi(cdb10(0x2a, 0, 8), 4096, false, true, make([]byte, 4096), true)
	r.tmf(tmfAbortTask, r.itt-1)
	r.c.close()
	if r.c.heldNothing() {
		t.Fatal("running commands' buffers were given back while they run")
	}
	r.runAll()
	r.checkEmpty()
	r.expectNothing()
}

func TestCoreTenantLimitAnswersTaskSetFullAndOtherTenantsAreServed(t *testing.T) {
	rc := rigConfig{opts: Options{Logger: quietLogger(), MaxConnections: 1024, MaxBufferBytes: 512 << 20}}
	rc.params = defaultParams(DefaultPolicy().MaxRecvDataSegmentLength)
	rc.params.InitialR2T = true
	srv := NewServer(rc.opts)
	noisyCfg := rc
	noisyCfg.limits = Limits{BufferBytes: 32 << 20}
	noisy := newCoreRigOn(t, srv, "noisy", noisyCfg)
	quiet := newCoreRigOn(t, srv, "quiet", rc)
	// The noisy tenant's WRITEs wait for data until its limit.
	full := 0
	for range 12 {
		noisy.scsi(cdb10(0x2a, 0, 8192), 4<<20, false, true, nil, true)
		for len(noisy.wire) > 0 {
			f := noisy.recv()
			if f.BHS.opcode() == opSCSIResp && f.BHS[offStatus] == scsi.StatusTaskSetFull {
				full++
			}
		}
	}
	if full != 4 {
		t.Fatalf("%d TASK SET FULL, want 4 (8 × 4 MiB fit in 32 MiB)", full)
	}
	quiet.scsi([]byte{0x12, 0, 0, 0, 36, 0}, 36, true, false, nil, true)
	if f := quiet.expectOp(opDataIn); f.BHS[offStatus] != 0 {
		t.Fatalf("other tenant's INQUIRY: status %d", f.BHS[offStatus])
	}
	noisy.closeAndDrain()
	quiet.closeAndDrain()
	noisy.checkEmpty()
	quiet.checkEmpty()
}

func TestCoreBusyTenantCannotTakeTheServersLastHeadroom(t *testing.T) {
	rc := rigConfig{opts: Options{Logger: quietLogger(), MaxConnections: 1024, MaxBufferBytes: 1 << 30}}
	rc.params = defaultParams(DefaultPolicy().MaxRecvDataSegmentLength)
	rc.params.InitialR2T = true
	srv := NewServer(rc.opts)
	var noisy []*coreRig
	// Four tenants each at their own 256 MiB would use the whole server.
	for i := range 4 {
		nc := rc
		nc.limits = Limits{BufferBytes: 256 << 20}
		n := newCoreRigOn(t, srv, "noisy"+string(rune('a'+i)), nc)
		for range 4 {
			n.scsi(cdb10(0x2a, 0, 65535), 64<<20, false, true, nil, true)
		}
		noisy = append(noisy, n)
	}
	if used := srv.ledger.used[resBytes].Load(); used > (1<<30)-srv.ledger.headroom[resBytes] {
		t.Fatalf("busy tenants hold %d bytes, beyond the fair share %d", used, (1<<30)-srv.ledger.headroom[resBytes])
	}
	quiet := newCoreRigOn(t, srv, "quiet", rc)
	quiet.scsi(cdb10(0x2a, 0, 8192), 4<<20, false, true, nil, true)
	if f := quiet.expectOp(opR2T); f == nil {
		t.Fatal("quiet tenant's WRITE was not taken")
	}
	for _, n := range append(noisy, quiet) {
		n.closeAndDrain()
	}
	for _, n := range append(noisy, quiet) {
		n.checkEmpty()
	}
}

func TestCoreTooManyImmediateCommandsAreRejected(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	for range maxImmediate {
		r.pdu(r.command([]byte{0}, 0, false, false, true, true), nil, nil)
	}
	r.pdu(r.command([]byte{0}, 0, false, false, true, true), nil, nil)
	if f := r.expectOp(opReject); f.BHS[2] != rejectImmediate {
		t.Fatalf("reject reason %d", f.BHS[2])
	}
	r.closeAndCheck()
}

func TestCoreDuplicateTaskTagIsRejectedAndFreesItsSlot(t *testing.T) {
	r := newCoreRig(t, withOptions(func(o *Options) { o.QueueDepth = 2 }))
	r.autoRun = false
	r.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
	h := r.command(cdb10(0x28, 0, 1), 512, true, false, true, false)
	h.setU32(offITT, r.itt-1)
	r.pdu(h, nil, nil)
	if f := r.expectOp(opReject); f.BHS[2] != rejectTaskInProgress {
		t.Fatalf("reject reason %d", f.BHS[2])
	}
	if r.c.win.inflight != 1 {
		t.Fatalf("window holds %d slots, want 1", r.c.win.inflight)
	}
	r.closeAndCheck()
}

func TestCoreOversizedTransferIsRefusedWithoutBuffer(t *testing.T) {
	r := newCoreRig(t)
	r.scsi(cdb10(0x28, 0, 1), maxTransfer+512, true, false, nil, true)
	f := r.expectOp(opSCSIResp)
	if f.BHS[offStatus] != scsi.StatusCheckCondition || f.Data[2+2]&0x0f != scsi.SenseIllegalRequest {
		t.Fatalf("status %d sense % x", f.BHS[offStatus], f.Data)
	}
	r.closeAndCheck()
}

func TestCoreUnknownOpcodeAndSNACKAreRejectedAndTheConnectionSurvives(t *testing.T) {
	r := newCoreRig(t)
	for _, op := range []byte{0x1c, opSNACK} {
		h := new(bhs)
		h[0] = op
		h.setU32(offITT, 9)
		r.pdu(h, nil, []byte("junk"))
		f := r.expectOp(opReject)
		if !bytes.Equal(f.Data[:1], []byte{op}) {
			t.Fatalf("reject does not carry the header: % x", f.Data[:4])
		}
	}
	r.scsi([]byte{0}, 0, false, false, nil, true)
	r.expectOp(opSCSIResp)
	r.closeAndCheck()
}

func TestCoreDataDigestErrorRejectsAndEnds(t *testing.T) {
	r := newCoreRig(t)
	h := r.command(cdb10(0x2a, 0, 1), 512, false, true, true, false)
	h.setDataLen(512)
	l := r.c.header(h, nil)
	copy(l.buf, make([]byte, 512))
	r.c.data(false)
	r.after()
	if f := r.expectOp(opReject); f.BHS[2] != rejectDataDigest {
		t.Fatalf("reject reason %d", f.BHS[2])
	}
	if r.c.act.end != endAfterSend {
		t.Fatal("connection does not end after a data digest error")
	}
	r.closeAndCheck()
}

func TestCoreLoginInFullFeaturePhaseIsAProtocolError(t *testing.T) {
	r := newCoreRig(t)
	h := new(bhs)
	h[0] = opLoginReq
	r.pdu(h, nil, nil)
	if f := r.expectOp(opReject); f.BHS[2] != rejectProtocol || r.c.act.end != endAfterSend {
		t.Fatalf("reject %d end %d", f.BHS[2], r.c.act.end)
	}
	r.closeAndCheck()
}

func TestCoreDiscoverySessionTakesNoSCSICommands(t *testing.T) {
	r := newCoreRig(t, discoverySession())
	r.scsi([]byte{0}, 0, false, false, nil, true)
	r.expectOp(opReject)
	r.text(5, reservedTag, false, []byte("SendTargets=All\x00"))
	f := r.expectOp(opTextResp)
	kv := answers(t, f.Data)
	if kv["TargetName"] != r.tg.IQN() || kv["TargetAddress"] != "10.0.0.1:3260,1" {
		t.Fatalf("SendTargets answered %q", f.Data)
	}
	r.closeAndCheck()
}

func TestCoreLongTextAnswerIsSplitAtTheInitiatorsSegmentLength(t *testing.T) {
	r := newCoreRig(t, discoverySession(), withParams(func(p *params) { p.InitiatorRecvDSL = 512 }))
	for i := range 40 {
		tg := newTarget(TargetConfig{IQN: "iqn.2026-01.test.nstarget:long-name-number-" + strings.Repeat("x", 20) + string(rune('a'+i%26)) + string(rune('a'+i/26))}, newRAMDevice(512))
		r.tenant.Targets = append(r.tenant.Targets, tg)
	}
	// The request itself comes in two parts.
	r.text(6, reservedTag, true, []byte("SendTar"))
	if f := r.expectOp(opTextResp); f.BHS[1]&flagFinal != 0 || len(f.Data) != 0 {
		t.Fatal("continued request not acknowledged with an empty non-final response")
	}
	r.text(6, reservedTag, false, []byte("gets=All\x00"))
	var all []byte
	for {
		f := r.expectOp(opTextResp)
		if len(f.Data) > 512 {
			t.Fatalf("text response of %d bytes beyond MaxRecvDataSegmentLength 512", len(f.Data))
		}
		all = append(all, f.Data...)
		if f.BHS[1]&flagFinal != 0 {
			break
		}
		if f.BHS[1]&flagContinue == 0 {
			t.Fatal("partial answer without the C bit")
		}
		r.text(6, f.BHS.u32(offTTT), false, nil)
	}
	if n := strings.Count(string(all), "TargetName="); n != 41 {
		t.Fatalf("%d targets listed, want 41", n)
	}
	r.closeAndCheck()
}

func TestCoreAsyncLogoutRequestIsSentOnce(t *testing.T) {
	r := newCoreRig(t)
	r.c.requestLogout(10)
	r.c.requestLogout(10)
	r.after()
	f := r.expectOp(opAsync)
	if f.BHS[offAsyncEvent] != asyncLogoutRequest || binary.BigEndian.Uint16(f.BHS[offAsyncParam3:]) != 10 {
		t.Fatalf("async event %d param3 %d", f.BHS[offAsyncEvent], binary.BigEndian.Uint16(f.BHS[offAsyncParam3:]))
	}
	r.expectNothing()
	r.closeAndCheck()
}

func TestCoreStatSNFollowsWireOrder(t *testing.T) {
	r := newCoreRig(t)
	r.autoRun = false
	for range 5 {
		r.scsi(cdb10(0x28, 0, 1), 512, true, false, nil, true)
		r.nopOut(50, true, nil)
	}
	// Complete in reverse order: StatSN still counts up on the wire.
	for i := len(r.running) - 1; i >= 0; i-- {
		r.complete(r.running[i], r.execute(r.running[i]))
	}
	r.running = nil
	want := uint32(1000)
	for len(r.wire) > 0 {
		f := r.recv()
		if f.BHS.opcode() == opDataIn && f.BHS[1]&flagStatus == 0 {
			continue
		}
		if got := f.BHS.u32(offStatSN); got != want {
			t.Fatalf("StatSN %d, want %d", got, want)
		}
		want++
	}
	r.closeAndCheck()
}
