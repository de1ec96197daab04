package target

import (
	"sync"

	"nstarget/target/scsi"
)

// cmdWindow is the CmdSN window of a session (RFC 7143 §4.2.2.1). Commands are accepted in
// CmdSN order; a non-immediate command occupies a slot until its response is queued, so
// MaxCmdSN only advances as work completes and never moves backwards.
type cmdWindow struct {
	expCmdSN uint32
	depth    uint32
	inflight uint32
}

// accept reports whether a command with cmdSN may run now. Immediate commands do not take a
// slot or advance ExpCmdSN (a NOP-Out ping with I set must not consume a CmdSN).
func (w *cmdWindow) accept(cmdSN uint32, immediate bool) bool {
	if immediate {
		return true
	}
	if cmdSN != w.expCmdSN || w.inflight >= w.depth {
		return false
	}
	w.expCmdSN++
	w.inflight++
	return true
}

// done frees the slot of a completed non-immediate command.
func (w *cmdWindow) done() {
	if w.inflight > 0 {
		w.inflight--
	}
}

func (w *cmdWindow) maxCmdSN() uint32 { return w.expCmdSN + w.depth - 1 - w.inflight }

// session is one normal or discovery session. With MaxConnections=1 it has exactly one
// connection, which owns its I/O; the session holds what outlives a PDU: identity, nexus and
// command window.
type session struct {
	key       sessionKey
	tsih      uint16
	discovery bool
	tg        *Target
	nexus     scsi.Nexus
	params    params
	conn      *conn

	mu  sync.Mutex
	win cmdWindow
}

func (ss *session) accept(cmdSN uint32, immediate bool) bool {
	ss.mu.Lock()
	ok := ss.win.accept(cmdSN, immediate)
	ss.mu.Unlock()
	return ok
}

func (ss *session) done() {
	ss.mu.Lock()
	ss.win.done()
	ss.mu.Unlock()
}

func (ss *session) snapshot() (exp, max uint32) {
	ss.mu.Lock()
	exp, max = ss.win.expCmdSN, ss.win.maxCmdSN()
	ss.mu.Unlock()
	return
}
