// Package scsi is the SCSI block device server (SBC-4/SPC-5) behind the iSCSI target: it
// decodes CDBs, moves data between transport buffers and backend volumes, and keeps per-LU state
// (reservations, persistent reservations, unit attentions, mode pages).
//
// It must never: do network I/O or know about iSCSI PDUs, allocate or copy data buffers per
// I/O when the transport's buffer can be used, write outside the LBA range a command addresses,
// or panic on any CDB (unknown or malformed input is CHECK CONDITION with correct sense).
//
// THIS FILE IS THE CONTRACT the iSCSI layer compiles against. The implementation replaces the
// stub bodies; exported names and meanings stay (additions are fine).
package scsi

import "nstarget/backend"

// Status codes (SAM-5).
const (
	StatusGood                = 0x00
	StatusCheckCondition      = 0x02
	StatusBusy                = 0x08
	StatusReservationConflict = 0x18
	StatusTaskSetFull         = 0x28
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
	LUN         uint64 // decoded flat LUN number
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

// LUConfig describes one logical unit.
type LUConfig struct {
	BlockSize  uint32 // default 512
	ReadOnly   bool
	Vendor     string // INQUIRY vendor, default "NSTARGET"
	Product    string // INQUIRY product, default "VOLUME"
	Serial     string // unit serial number; default derived from the volume name
	WriteCache bool   // report a volatile write cache (WCE=1) and honour FUA/SYNC CACHE
}

// LU is one logical unit backed by one volume. Safe for concurrent use.
type LU struct{}

// NewLU makes a logical unit on vol. Device identifiers (VPD 0x80/0x83) derive from the volume,
// never from the tenant's network, so they are stable across restarts and addresses.
func NewLU(vol backend.Volume, cfg LUConfig) (*LU, error) { panic("scsi: not implemented") }

// Device is the SCSI target device of one iSCSI target: its LUN map. It answers REPORT LUNS and
// commands to LUNs that do not exist, and routes the rest to the LU.
type Device struct{}

// NewDevice builds a device from a LUN map.
func NewDevice(luns map[uint64]*LU) *Device { panic("scsi: not implemented") }

// Execute runs cmd to completion. Safe to call from many goroutines at once.
func (d *Device) Execute(cmd *Command) Result { panic("scsi: not implemented") }

// LUNReset resets one LU on behalf of nexus (clears SPC-2 reservations, sets unit attentions).
func (d *Device) LUNReset(lun uint64, nexus *Nexus) error { panic("scsi: not implemented") }

// TargetReset resets every LU (TARGET WARM RESET).
func (d *Device) TargetReset(nexus *Nexus) { panic("scsi: not implemented") }

// NexusLoss is called when a session ends (logout, connection loss, reinstatement): SPC-2
// reservations held by it are released; persistent reservations stay.
func (d *Device) NexusLoss(nexus *Nexus) { panic("scsi: not implemented") }
