package target

import "sync/atomic"

// cmdWindow is the CmdSN window of a session (RFC 7143 §4.2.2.1). Commands are accepted in
// CmdSN order; a non-immediate command occupies a slot until its response is queued, so
// MaxCmdSN only advances as work completes and never moves backwards.
//
// share, when set, is the tenant's fair share of the window (fair.go): while several tenants
// are busy it may be smaller than depth, and the window then closes as commands complete
// instead of reopening. An initiator keeps what it was granted (MaxCmdSN never decreases), so
// a shrinking share takes effect over the next commands, not by refusing any.
type cmdWindow struct {
	expCmdSN uint32
	depth    uint32
	inflight uint32
	share    *atomic.Uint32 // commands this session may have in flight now; 0: depth
	sent     uint32         // the highest MaxCmdSN advertised
}

func newCmdWindow(expCmdSN, depth uint32, share *atomic.Uint32) cmdWindow {
	// The login response advertised the full depth.
	return cmdWindow{expCmdSN: expCmdSN, depth: depth, share: share, sent: expCmdSN + depth - 1}
}

// accept reports whether a command with cmdSN may run now. Immediate commands do not take a
// slot or advance ExpCmdSN (a NOP-Out ping with I set must not consume a CmdSN).
func (w *cmdWindow) accept(cmdSN uint32, immediate bool) bool {
	if immediate {
		return true
	}
	// Beyond the advertised MaxCmdSN (an initiator that ignores its window, perhaps to get
	// past its tenant's fair share) is outside the window just like a full depth.
	if cmdSN != w.expCmdSN || w.inflight >= w.depth || int32(cmdSN-w.sent) > 0 {
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

// maxCmdSN is the MaxCmdSN to advertise now, and remembers it.
func (w *cmdWindow) maxCmdSN() uint32 {
	d := w.depth
	if w.share != nil {
		if s := w.share.Load(); s > 0 && s < d {
			d = s
		}
	}
	m := w.expCmdSN - 1 // closed: no new command until one completes
	if w.inflight < d {
		m = w.expCmdSN + d - 1 - w.inflight
	}
	if int32(m-w.sent) > 0 {
		w.sent = m
	}
	return w.sent
}
