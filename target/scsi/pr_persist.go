package scsi

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"

	"nstarget/backend"
)

// prStateKey names the LU's persistent reservation state in its volume's StateStore.
const prStateKey = "pr"

// ascInsufficientRegistrationResources answers a PERSISTENT RESERVE OUT whose APTPL state
// could not be saved (SPC-5 6.17.1: insufficient device server resources).
const ascInsufficientRegistrationResources asc = 0x5504

// prFile is the saved form of prState while APTPL is in effect (SPC-5 5.14.5: the last valid
// APTPL bit received decides whether registrations and the reservation survive power loss).
// Registrations carry what identifies an initiator port in an iSCSI TransportID (name and
// ISID), so a nexus that logs in after a restart finds its registration again.
type prFile struct {
	Version       int         `json:"version"`
	Generation    uint32      `json:"generation"`
	Type          byte        `json:"type,omitempty"`   // 0: no reservation
	Holder        string      `json:"holder,omitempty"` // initiator port of the holder
	Registrations []prFileReg `json:"registrations"`
}

type prFileReg struct {
	Initiator string `json:"initiator"`
	ISID      string `json:"isid"` // 12 hex digits
	RelPort   uint16 `json:"relative_target_port"`
	Key       string `json:"key"` // 0x + 16 hex digits: JSON numbers lose 64-bit precision in many tools
}

const prFileVersion = 1

// clone copies p deeply, so a failed save can restore the state the initiator last saw.
func (p *prState) clone() prState {
	c := *p
	c.regs = make([]*registrant, len(p.regs))
	for i, r := range p.regs {
		x := *r
		c.regs[i] = &x
		if p.holder == r {
			c.holder = &x
		}
	}
	return c
}

// encode is the saved form of p.
func (p *prState) encode() ([]byte, error) {
	f := prFile{Version: prFileVersion, Generation: p.generation, Type: p.typ, Registrations: []prFileReg{}}
	if p.typ != 0 && p.holder != nil {
		f.Holder = p.holder.port
	}
	for _, r := range p.regs {
		f.Registrations = append(f.Registrations, prFileReg{
			Initiator: r.initiator,
			ISID:      hex.EncodeToString(r.isid[:]),
			RelPort:   r.relPort,
			Key:       fmt.Sprintf("0x%016x", r.key),
		})
	}
	return json.MarshalIndent(f, "", "  ")
}

// decodePRState rebuilds the state saved by encode; anything inconsistent is an error rather
// than a guess, as a wrong reservation hands a disk to the wrong host.
func decodePRState(b []byte) (prState, error) {
	var f prFile
	if err := json.Unmarshal(b, &f); err != nil {
		return prState{}, err
	}
	if f.Version != prFileVersion {
		return prState{}, fmt.Errorf("version %d, want %d", f.Version, prFileVersion)
	}
	p := prState{generation: f.Generation, typ: f.Type, aptpl: true}
	for i, fr := range f.Registrations {
		r, err := fr.registrant()
		if err != nil {
			return prState{}, fmt.Errorf("registration %d: %w", i, err)
		}
		if p.findPort(r.port) != nil {
			return prState{}, fmt.Errorf("registration %d: initiator port %s registered twice", i, r.port)
		}
		p.regs = append(p.regs, r)
	}
	if err := p.restoreHolder(f.Holder); err != nil {
		return prState{}, err
	}
	return p, nil
}

func (fr prFileReg) registrant() (*registrant, error) {
	if fr.Initiator == "" {
		return nil, errors.New("no initiator name")
	}
	isid, err := hex.DecodeString(fr.ISID)
	if err != nil || len(isid) != 6 {
		return nil, fmt.Errorf("isid %q: not 12 hex digits", fr.ISID)
	}
	key, err := strconv.ParseUint(fr.Key, 0, 64)
	if err != nil || key == 0 {
		return nil, fmt.Errorf("key %q: not a non-zero 64-bit number", fr.Key)
	}
	r := &registrant{initiator: fr.Initiator, relPort: fr.RelPort, key: key}
	copy(r.isid[:], isid)
	// The same rule as for a live nexus, so a later login matches.
	r.port = portOf(&Nexus{InitiatorName: r.initiator, ISID: r.isid})
	return r, nil
}

func (p *prState) restoreHolder(holder string) error {
	if p.typ == 0 {
		if holder != "" {
			return errors.New("a holder without a reservation")
		}
		return nil
	}
	if !validType(p.typ) {
		return fmt.Errorf("reservation type %#x unknown", p.typ)
	}
	if len(p.regs) == 0 {
		return errors.New("a reservation without registrations")
	}
	p.holder = p.findPort(holder)
	if p.holder == nil && !allRegistrants(p.typ) {
		return fmt.Errorf("holder %q is not registered", holder)
	}
	return nil
}

// samePR reports whether a and b would be saved identically (and so need no save).
func samePR(a, b *prState) bool {
	if a.generation != b.generation || a.typ != b.typ || a.aptpl != b.aptpl || len(a.regs) != len(b.regs) {
		return false
	}
	if (a.holder == nil) != (b.holder == nil) || (a.holder != nil && a.holder.port != b.holder.port) {
		return false
	}
	return slices.EqualFunc(a.regs, b.regs, func(x, y *registrant) bool { return *x == *y })
}

// loadPR restores the state saved under APTPL when the LU opens; mu need not be held (the LU
// is not shared yet).
func (lu *LU) loadPR() error {
	if lu.prStore == nil {
		return nil
	}
	b, err := lu.prStore.LoadState(prStateKey)
	if err != nil || b == nil {
		return err
	}
	p, err := decodePRState(b)
	if err != nil {
		return fmt.Errorf("scsi: volume %q: saved persistent reservations: %w", lu.vol.Name(), err)
	}
	lu.pr = p
	lu.recomputeGate()
	return nil
}

// persistPRLocked saves the state after a PERSISTENT RESERVE OUT changed it from before, while
// APTPL is in effect; when APTPL was just withdrawn, or nothing is left to keep, it removes
// the saved state, so nothing stale comes back after a restart. mu must be held, so saves
// happen in the order of the changes. PR changes are rare; this may allocate and block.
func (lu *LU) persistPRLocked(before *prState) error {
	p := &lu.pr
	if lu.prStore == nil || (!p.aptpl && !before.aptpl) || samePR(p, before) {
		return nil
	}
	if !p.aptpl || !p.active() {
		return lu.prStore.SaveState(prStateKey, nil)
	}
	b, err := p.encode()
	if err != nil {
		return fmt.Errorf("scsi: encode persistent reservations: %w", err)
	}
	return lu.prStore.SaveState(prStateKey, b)
}

// prStoreOf is the volume's state store, if its backend has one; without it APTPL is refused.
func prStoreOf(vol backend.Volume) backend.StateStore {
	s, _ := vol.(backend.StateStore)
	return s
}
