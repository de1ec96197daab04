package scsi

import (
	"fmt"
	"strings"
)

// Persistent reservation types (SPC-5 6.17.3.4).
const (
	prWE   = 0x1
	prEA   = 0x3
	prWERO = 0x5
	prEARO = 0x6
	prWEAR = 0x7
	prEAAR = 0x8
)

// PR OUT service actions.
const (
	saRegister       = 0x0
	saReserve        = 0x1
	saRelease        = 0x2
	saClear          = 0x3
	saPreempt        = 0x4
	saPreemptAbort   = 0x5
	saRegisterIgnore = 0x6
	// REGISTER AND MOVE (0x7) is not supported: one target port.
)

// registrant is one registered I_T nexus, identified by initiator port (name + ISID) so a
// reinstated session keeps its registration.
type registrant struct {
	port      string
	initiator string
	isid      [6]byte
	relPort   uint16
	key       uint64
}

// prState is the persistent reservation state of an LU; guarded by LU.mu. While aptpl is set
// it is also saved in the volume's state store (pr_persist.go) and restored when the LU opens.
type prState struct {
	generation uint32
	regs       []*registrant
	holder     *registrant // reservation holder for non-all-registrants types
	typ        byte        // 0: no reservation
	aptpl      bool        // the last valid APTPL bit received (SPC-5 5.14.5)
}

func (p *prState) active() bool { return len(p.regs) > 0 || p.typ != 0 }

func allRegistrants(t byte) bool { return t == prWEAR || t == prEAAR }

func portOf(n *Nexus) string {
	return strings.ToLower(n.InitiatorName) + ",i,0x" + fmt.Sprintf("%02x%02x%02x%02x%02x%02x",
		n.ISID[0], n.ISID[1], n.ISID[2], n.ISID[3], n.ISID[4], n.ISID[5])
}

func (p *prState) find(n *Nexus) *registrant {
	if len(p.regs) == 0 {
		return nil
	}
	return p.findPort(portOf(n))
}

func (p *prState) findPort(port string) *registrant {
	for _, r := range p.regs {
		if r.port == port {
			return r
		}
	}
	return nil
}

func (p *prState) isHolder(r *registrant) bool {
	if r == nil || p.typ == 0 {
		return false
	}
	return allRegistrants(p.typ) || p.holder == r
}

// conflicts applies SPC-5 table 63/SBC-4 table 14 to a command from the initiator port.
func (p *prState) conflicts(port string, flags uint32, cdb []byte) bool {
	if flags&fResv != 0 && len(p.regs) > 0 {
		return true
	}
	if p.typ == 0 || flags&fPRAlways != 0 {
		return false
	}
	r := p.findPort(port)
	if p.isHolder(r) {
		return false
	}
	if cdb[0] == opPreventAllow && cdb[4]&0x03 == 0 {
		return false
	}
	switch p.typ {
	case prWE:
		return flags&fPRRead == 0
	case prEA:
		return true
	case prWERO, prWEAR:
		return r == nil && flags&fPRRead == 0
	case prEARO, prEAAR:
		return r == nil
	}
	return true
}

func (p *prState) remove(r *registrant) {
	for i, x := range p.regs {
		if x == r {
			p.regs = append(p.regs[:i], p.regs[i+1:]...)
			break
		}
	}
	if p.holder == r {
		p.holder = nil
		if !allRegistrants(p.typ) {
			p.typ = 0
		}
	}
	if allRegistrants(p.typ) && len(p.regs) == 0 {
		p.typ = 0
	}
}

// uaForRegs queues code for every nexus of the given registrants except skip; mu must be held.
func (lu *LU) uaForRegs(code asc, regs []*registrant, skip *Nexus) {
	ports := make(map[string]bool, len(regs))
	for _, r := range regs {
		ports[r.port] = true
	}
	skipID := uint64(0)
	if skip != nil {
		skipID = skip.ID
	}
	lu.addUALocked(code, skipID, func(n *Nexus) bool { return n != nil && ports[portOf(n)] })
}

func (lu *LU) prIn(cmd *Command) Result {
	cdb := cmd.CDB
	sa := cdb[1] & 0x1F
	alloc := uint32(be16(cdb[7:9]))
	lu.mu.Lock()
	defer lu.mu.Unlock()
	p := &lu.pr
	var d []byte
	switch sa {
	case 0x00: // READ KEYS
		d = make([]byte, 8, 8+8*len(p.regs))
		put32(d[0:], p.generation)
		for _, r := range p.regs {
			var k [8]byte
			put64(k[:], r.key)
			d = append(d, k[:]...)
		}
		put32(d[4:], uint32(len(d)-8))
	case 0x01: // READ RESERVATION
		d = make([]byte, 8, 24)
		put32(d[0:], p.generation)
		if p.typ != 0 {
			var rd [16]byte
			if !allRegistrants(p.typ) && p.holder != nil {
				put64(rd[0:], p.holder.key)
			}
			rd[13] = p.typ // scope 0 (LU)
			d = append(d, rd[:]...)
		}
		put32(d[4:], uint32(len(d)-8))
	case 0x02: // REPORT CAPABILITIES
		d = make([]byte, 8)
		put16(d[0:], 8)
		d[2] = 0x10 | 0x04 // CRH, ATP_C
		d[3] = 0x80 | 0x10 // TMV, ALLOW COMMANDS = 001b
		if lu.prStore != nil {
			d[2] |= 0x01 // PTPL_C: APTPL can be honoured
		}
		if p.aptpl {
			d[3] |= 0x01 // PTPL_A: it is in effect
		}
		d[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02
		d[5] = 0x01
	case 0x03: // READ FULL STATUS
		d = make([]byte, 8, 256)
		put32(d[0:], p.generation)
		for _, r := range p.regs {
			tid := transportID(r)
			var desc [24]byte
			put64(desc[0:], r.key)
			if p.isHolder(r) {
				desc[12] = 0x01
				desc[13] = p.typ
			}
			put16(desc[18:], r.relPort)
			put32(desc[20:], uint32(len(tid)))
			d = append(d, desc[:]...)
			d = append(d, tid...)
		}
		put32(d[4:], uint32(len(d)-8))
	default:
		return invalidCDB(1, 4)
	}
	return dataIn(cmd, d, alloc)
}

// transportID is the iSCSI TransportID with ISID (format 01b).
func transportID(r *registrant) []byte {
	name := fmt.Sprintf("%s,i,0x%02x%02x%02x%02x%02x%02x", r.initiator,
		r.isid[0], r.isid[1], r.isid[2], r.isid[3], r.isid[4], r.isid[5])
	b := make([]byte, 4, 4+len(name)+4)
	b[0] = 0x40 | 0x05
	b = append(b, name...)
	b = append(b, 0)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	put16(b[2:], uint16(len(b)-4))
	return b
}

func validType(t byte) bool {
	switch t {
	case prWE, prEA, prWERO, prEARO, prWEAR, prEAAR:
		return true
	}
	return false
}

func (lu *LU) prOut(cmd *Command) Result {
	cdb := cmd.CDB
	sa := cdb[1] & 0x1F
	scope := cdb[2] >> 4
	typ := cdb[2] & 0x0F
	plen := be32(cdb[5:9])
	w := uint64(plen)
	switch sa {
	case saRegister, saReserve, saRelease, saClear, saPreempt, saPreemptAbort, saRegisterIgnore:
	default:
		return withWanted(invalidCDB(1, 4), w)
	}
	if plen != 24 {
		return withWanted(paramListLengthError(), w)
	}
	if len(cmd.DataOut) < 24 {
		return withWanted(paramListLengthError(), w)
	}
	pd := cmd.DataOut[:24]
	key := be64(pd[0:8])
	sark := be64(pd[8:16])
	flags := pd[20]
	if flags&0x08 != 0 { // SPEC_I_PT
		return withWanted(invalidParam(20, 3), w)
	}
	aptpl := flags&0x01 != 0
	if aptpl && lu.prStore == nil { // nowhere to keep the state through power loss
		return withWanted(invalidParam(20, 0), w)
	}
	n := nexusOf(cmd)
	lu.mu.Lock()
	defer func() {
		lu.recomputeGate()
		lu.mu.Unlock()
	}()
	before := lu.pr.clone()
	r := lu.prOutLocked(n, sa, scope, typ, key, sark, aptpl)
	if r.Status == StatusGood {
		if err := lu.persistPRLocked(&before); err != nil {
			// The initiator must not believe a state survives power loss when it would not:
			// undo the change and say so.
			lu.pr = before
			r = illegal(ascInsufficientRegistrationResources)
		}
	}
	return withWanted(r, w)
}

// prOutLocked applies one PERSISTENT RESERVE OUT service action; mu must be held.
func (lu *LU) prOutLocked(n *Nexus, sa, scope, typ byte, key, sark uint64, aptpl bool) Result {
	p := &lu.pr
	r := p.find(n)

	switch sa {
	case saRegister, saRegisterIgnore:
		if r == nil {
			if sa == saRegister && key != 0 {
				return reservationConflict()
			}
			if sark != 0 {
				p.regs = append(p.regs, &registrant{port: portOf(n), initiator: n.InitiatorName, isid: n.ISID, relPort: relPortOf(n), key: sark})
				p.aptpl = aptpl
			}
			p.generation++
			return good()
		}
		if sa == saRegister && key != r.key {
			return reservationConflict()
		}
		p.aptpl = aptpl
		if sark == 0 {
			wasHolder := p.isHolder(r)
			oldTyp := p.typ
			p.remove(r)
			if wasHolder && p.typ == 0 && (oldTyp == prWERO || oldTyp == prEARO) {
				lu.uaForRegs(ascReservationsReleased, p.regs, n)
			}
		} else {
			r.key = sark
		}
		p.generation++
		return good()
	}

	if r == nil || r.key != key {
		return reservationConflict()
	}
	switch sa {
	case saReserve:
		if scope != 0 {
			return invalidCDB(2, 7)
		}
		if !validType(typ) {
			return invalidCDB(2, 3)
		}
		if p.typ == 0 {
			p.typ = typ
			p.holder = r
			return good()
		}
		if p.isHolder(r) && p.typ == typ {
			return good()
		}
		return reservationConflict()
	case saRelease:
		if p.typ == 0 || !p.isHolder(r) {
			return good()
		}
		if scope != 0 || typ != p.typ {
			return illegal(ascInvalidReleasePR)
		}
		old := p.typ
		p.typ = 0
		p.holder = nil
		if old != prWE && old != prEA {
			lu.uaForRegs(ascReservationsReleased, p.regs, n)
		}
		return good()
	case saClear:
		others := make([]*registrant, 0, len(p.regs))
		for _, x := range p.regs {
			if x != r {
				others = append(others, x)
			}
		}
		lu.uaForRegs(ascReservationsPreempted, others, n)
		p.regs = nil
		p.holder = nil
		p.typ = 0
		p.generation++
		return good()
	case saPreempt, saPreemptAbort:
		return lu.preemptLocked(n, r, sark, scope, typ)
	}
	return invalidCDB(1, 4)
}

// preemptLocked implements PREEMPT (and PREEMPT AND ABORT, whose task aborting is the
// transport's business) per SPC-5 5.14.11.2.4.
func (lu *LU) preemptLocked(n *Nexus, r *registrant, sark uint64, scope, typ byte) Result {
	p := &lu.pr
	removeMatching := func(keepSelf bool) []*registrant {
		var removed []*registrant
		kept := p.regs[:0]
		for _, x := range p.regs {
			if x.key == sark && !(keepSelf && x == r) {
				removed = append(removed, x)
				continue
			}
			kept = append(kept, x)
		}
		clear(p.regs[len(kept):])
		p.regs = kept
		return removed
	}
	if p.typ == 0 || (allRegistrants(p.typ) && sark != 0) {
		if sark == 0 {
			return invalidParam(8, -1)
		}
		removed := removeMatching(false)
		if len(removed) == 0 {
			return reservationConflict()
		}
		if p.holder != nil && !contains(p.regs, p.holder) {
			p.holder = nil
		}
		if allRegistrants(p.typ) && len(p.regs) == 0 {
			// The preempter removed itself with the rest: no registrant is left to hold it.
			p.typ = 0
		}
		lu.uaForRegs(ascRegistrationsPreempted, removed, n)
		p.generation++
		return good()
	}
	if scope != 0 {
		return invalidCDB(2, 7)
	}
	if !validType(typ) {
		return invalidCDB(2, 3)
	}
	if allRegistrants(p.typ) {
		// SARK 0 with an all-registrants reservation: everyone else goes, r holds.
		var removed []*registrant
		for _, x := range p.regs {
			if x != r {
				removed = append(removed, x)
			}
		}
		p.regs = []*registrant{r}
		p.typ = typ
		p.holder = r
		lu.uaForRegs(ascRegistrationsPreempted, removed, n)
		p.generation++
		return good()
	}
	if p.holder != nil && sark == p.holder.key {
		oldTyp := p.typ
		removed := removeMatching(true)
		p.typ = typ
		p.holder = r
		lu.uaForRegs(ascRegistrationsPreempted, removed, n)
		if oldTyp != typ {
			lu.uaForRegs(ascReservationsReleased, p.regs, n)
		}
		p.generation++
		return good()
	}
	if sark == 0 {
		return invalidParam(8, -1)
	}
	removed := removeMatching(false)
	if len(removed) == 0 {
		return reservationConflict()
	}
	lu.uaForRegs(ascRegistrationsPreempted, removed, n)
	p.generation++
	return good()
}

func contains(regs []*registrant, r *registrant) bool {
	for _, x := range regs {
		if x == r {
			return true
		}
	}
	return false
}

func relPortOf(n *Nexus) uint16 {
	if n.RelTargetPortID != 0 {
		return n.RelTargetPortID
	}
	return 1
}

// reserve is SPC-2 RESERVE(6)/(10) of the whole LU.
func (lu *LU) reserve(cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[0] == opReserve10 && cdb[1]&0x13 != 0 {
		return invalidCDB(1, -1) // third-party / extents not supported
	}
	if cdb[0] == opReserve6 && cdb[1]&0x01 != 0 {
		return invalidCDB(1, 0)
	}
	n := nexusOf(cmd)
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.resv2 != nil && lu.resv2ID != n.ID {
		return reservationConflict()
	}
	lu.resv2 = n
	lu.resv2ID = n.ID
	lu.recomputeGate()
	return good()
}

// release drops the SPC-2 reservation if n holds it; from anyone else it is a no-op.
func (lu *LU) release(cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[0] == opRelease10 && cdb[1]&0x13 != 0 {
		return invalidCDB(1, -1)
	}
	n := nexusOf(cmd)
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.resv2 != nil && lu.resv2ID == n.ID {
		lu.resv2 = nil
		lu.resv2ID = 0
		lu.recomputeGate()
	}
	return good()
}

// Reservation says who holds a reservation of the LU, for operators: the holder's I_T nexus
// ("iqn...,i,0x<isid>") and the kind, or "" when nothing is reserved.
func (lu *LU) Reservation() (holder, kind string) {
	lu.mu.RLock()
	defer lu.mu.RUnlock()
	switch {
	case lu.resv2 != nil:
		return portOf(lu.resv2), "reserve(6/10)"
	case lu.pr.typ != 0 && allRegistrants(lu.pr.typ):
		return "all registrants", fmt.Sprintf("persistent type %d", lu.pr.typ)
	case lu.pr.typ != 0 && lu.pr.holder != nil:
		return lu.pr.holder.port, fmt.Sprintf("persistent type %d", lu.pr.typ)
	}
	return "", ""
}
