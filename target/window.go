package target

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
