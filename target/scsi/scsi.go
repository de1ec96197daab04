// Package scsi is the SCSI block device server (SBC-4/SPC-5) behind the iSCSI target: it
// decodes CDBs, moves data between transport buffers and backend volumes, and keeps per-LU state
// (reservations, persistent reservations, unit attentions, mode pages).
//
// It must never: do network I/O or know about iSCSI PDUs, allocate or copy data buffers per
// I/O when the transport's buffer can be used, write outside the LBA range a command addresses,
// or panic on any CDB (unknown or malformed input is CHECK CONDITION with correct sense).
//
// This file holds the surface the iSCSI layer uses; the commands live in the other files.
package scsi

import (
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
)

// Status codes (SAM-5).
const (
	StatusGood                = 0x00
	StatusCheckCondition      = 0x02
	StatusBusy                = 0x08
	StatusReservationConflict = 0x18
	StatusTaskSetFull         = 0x28
)

// Sense keys (SPC-5 4.4.8).
const (
	SenseNoSense        = 0x00
	SenseMediumError    = 0x03
	SenseIllegalRequest = 0x05
	SenseUnitAttention  = 0x06
	SenseDataProtect    = 0x07
	SenseAbortedCommand = 0x0B
	SenseMiscompare     = 0x0E
)

// Nexus identifies an I_T nexus (one iSCSI session): reservations, registrations and unit
// attentions are kept per nexus.
type Nexus struct {
	ID              uint64 // unique per session for the process lifetime
	InitiatorName   string // iSCSI initiator name (TransportID for PR)
	ISID            [6]byte
	TargetName      string
	RelTargetPortID uint16 // relative target port identifier (1)
	TPGT            uint16
}

// Command is one SCSI command as the transport received it.
type Command struct {
	Nexus       *Nexus
	LUN         uint64 // DecodeLUN of the transport's 8-byte LUN field
	CDB         []byte
	Tag         uint32
	ExpectedLen uint32 // transport's expected data transfer length
	// DataOut holds the Data-Out the transport received (len <= ExpectedLen); it may be shorter
	// or longer than the CDB asks for: use only what is there and within range.
	DataOut []byte
	// DataIn is the caller's buffer, len == ExpectedLen for a read; fill from the start.
	DataIn []byte
}

// Result is the outcome of Execute.
type Result struct {
	Status    byte
	Sense     []byte // fixed-format sense data when Status is CHECK CONDITION
	DataInLen int    // bytes of Command.DataIn filled
	// Wanted is the transfer length the CDB itself asked for (bytes); the transport derives
	// residual overflow/underflow from it and ExpectedLen.
	Wanted uint32
}

// LU and NewLU live in lu.go.

// LUConfig describes one logical unit.
type LUConfig struct {
	BlockSize  uint32 // default 512
	ReadOnly   bool
	Vendor     string // INQUIRY vendor, default "NSTARGET"
	Product    string // INQUIRY product, default "VOLUME"
	Serial     string // unit serial number; default derived from the volume name
	WriteCache bool   // report a volatile write cache (WCE=1) and honour FUA/SYNC CACHE
}

// Device is the SCSI target device of one iSCSI target: its LUN map. It answers REPORT LUNS and
// commands to LUNs that do not exist, and routes the rest to the LU. The map can be replaced
// while sessions run (SetLUNs); every attached nexus is then told so by a unit attention.
type Device struct {
	table atomic.Pointer[lunTable]

	// mu guards attached and serialises SetLUNs; the data path never takes it.
	mu       sync.Mutex
	attached map[uint64]*Nexus // sessions logged in to this device, by Nexus.ID
}

// lunTable is one immutable LUN map: a new one replaces it whole, so a command sees either
// the old map or the new one.
type lunTable struct {
	luns   map[uint64]*LU
	sorted []uint64
}

func newLUNTable(luns map[uint64]*LU) *lunTable {
	t := &lunTable{luns: make(map[uint64]*LU, len(luns))}
	for n, lu := range luns {
		if lu == nil {
			continue
		}
		t.luns[n] = lu
		t.sorted = append(t.sorted, n)
	}
	slices.Sort(t.sorted)
	return t
}

// NewDevice builds a device from a LUN map. The map is copied; nil LUs are ignored.
func NewDevice(luns map[uint64]*LU) *Device {
	d := &Device{attached: make(map[uint64]*Nexus)}
	d.table.Store(newLUNTable(luns))
	return d
}

// LUNs returns a copy of the current LUN map.
func (d *Device) LUNs() map[uint64]*LU {
	return maps.Clone(d.table.Load().luns)
}

// SetLUNs replaces the LUN map while sessions run. Commands already executing finish on the
// LU they started on; from now on a removed LUN answers LOGICAL UNIT NOT SUPPORTED. Every
// attached nexus gets REPORTED LUNS DATA HAS CHANGED on the LUs it can still reach, until
// it issues REPORT LUNS. An identical map changes nothing.
func (d *Device) SetLUNs(luns map[uint64]*LU) {
	d.mu.Lock()
	defer d.mu.Unlock()
	next := newLUNTable(luns)
	if maps.Equal(next.luns, d.table.Load().luns) {
		return
	}
	d.table.Store(next)
	for _, lu := range next.luns {
		lu.addUAFor(ascReportedLUNsChanged, d.attached)
	}
}

// Attach registers a nexus that logged in to this device, so that it hears of LUN changes
// even on LUs it has not addressed yet; NexusLoss forgets it.
func (d *Device) Attach(nexus *Nexus) {
	d.mu.Lock()
	d.attached[nexus.ID] = nexus
	d.mu.Unlock()
}

// Execute runs cmd to completion. Safe to call from many goroutines at once.
func (d *Device) Execute(cmd *Command) Result {
	if cmd == nil || len(cmd.CDB) == 0 {
		return invalidOpcode()
	}
	t := d.table.Load()
	if cmd.CDB[0] == opReportLUNs {
		return d.reportLUNs(t, cmd)
	}
	lu := t.luns[cmd.LUN]
	if lu == nil {
		return noSuchLUN(cmd)
	}
	return lu.execute(cmd)
}

// LUNReset resets one LU on behalf of nexus (clears SPC-2 reservations, sets unit attentions).
func (d *Device) LUNReset(lun uint64, nexus *Nexus) error {
	lu := d.table.Load().luns[lun]
	if lu == nil {
		return fmt.Errorf("scsi: LUN reset: LUN %d does not exist", lun)
	}
	lu.reset(nexus)
	return nil
}

// TargetReset resets every LU (TARGET WARM RESET).
func (d *Device) TargetReset(nexus *Nexus) {
	for _, lu := range d.table.Load().luns {
		lu.reset(nexus)
	}
}

// NexusLoss is called when a session ends (logout, connection loss, reinstatement): SPC-2
// reservations held by it are released; persistent reservations stay.
func (d *Device) NexusLoss(nexus *Nexus) {
	if nexus == nil {
		return
	}
	d.mu.Lock()
	delete(d.attached, nexus.ID)
	d.mu.Unlock()
	for _, lu := range d.table.Load().luns {
		lu.nexusLoss(nexus)
	}
}

// CheckCondition is CHECK CONDITION with fixed-format sense (key, ASC, ASCQ), for the errors
// the transport finds itself (a broken Data-Out sequence, a CDB it cannot deliver), so that
// every sense the initiator sees comes from one builder.
func CheckCondition(key, asc, ascq byte) Result {
	return checkCond(key, ascCode(asc, ascq))
}

// EncodeLUN is the 8-byte SAM-5 LUN field, as a big-endian integer, for LUN numbers below
// 16384: peripheral device addressing below 256, flat space addressing above. Larger values
// cannot be addressed that way and are returned as they are, the raw field that DecodeLUN
// passes through.
func EncodeLUN(lun uint64) uint64 {
	switch {
	case lun < 256:
		return lun << 48
	case lun < 1<<14:
		return (0x4000 | lun) << 48
	}
	return lun
}

// DecodeLUN is the LUN number of an 8-byte LUN field (big-endian) in peripheral device
// addressing on bus 0 or flat space addressing. Anything else (another bus, another method) is
// returned raw: it is not a number EncodeLUN hands out, so it names no LU and gets LOGICAL
// UNIT NOT SUPPORTED instead of aliasing one. Only the first level is read; initiators may
// leave the others non-zero.
func DecodeLUN(raw uint64) uint64 {
	first := uint16(raw >> 48)
	switch first >> 14 {
	case 0:
		if first>>8 == 0 {
			return uint64(first & 0xff)
		}
	case 1:
		return uint64(first & 0x3fff)
	}
	return raw
}
