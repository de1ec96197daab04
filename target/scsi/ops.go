package scsi

// Operation codes.
const (
	opTestUnitReady    = 0x00
	opRequestSense     = 0x03
	opRead6            = 0x08
	opWrite6           = 0x0A
	opInquiry          = 0x12
	opModeSelect6      = 0x15
	opReserve6         = 0x16
	opRelease6         = 0x17
	opModeSense6       = 0x1A
	opStartStopUnit    = 0x1B
	opPreventAllow     = 0x1E
	opReadCapacity10   = 0x25
	opReadDefect10     = 0x37
	opReadDefect12     = 0xB7
	opWriteAtomic16    = 0x9C
	opRead10           = 0x28
	opWrite10          = 0x2A
	opWriteVerify10    = 0x2E
	opVerify10         = 0x2F
	opPrefetch10       = 0x34
	opSyncCache10      = 0x35
	opWriteSame10      = 0x41
	opUnmap            = 0x42
	opModeSelect10     = 0x55
	opReserve10        = 0x56
	opRelease10        = 0x57
	opModeSense10      = 0x5A
	opLogSense         = 0x4D
	opPRIn             = 0x5E
	opPROut            = 0x5F
	opRead16           = 0x88
	opCompareAndWrite  = 0x89
	opWrite16          = 0x8A
	opOrWrite16        = 0x8B
	opWriteVerify16    = 0x8E
	opVerify16         = 0x8F
	opPrefetch16       = 0x90
	opSyncCache16      = 0x91
	opWriteSame16      = 0x93
	opServiceActionIn  = 0x9E
	opReportLUNs       = 0xA0
	opMaintenanceIn    = 0xA3
	opRead12           = 0xA8
	opWrite12          = 0xAA
	opWriteVerify12    = 0xAE
	opVerify12         = 0xAF
	saReadCapacity16   = 0x10
	saGetLBAStatus     = 0x12
	saReportTPG        = 0x0A
	saReportSupportOps = 0x0C
)

// Command flags: how unit attentions and reservations treat a command.
const (
	fNoUA     = 1 << iota // reported even with a pending unit attention (INQUIRY, REPORT LUNS, REQUEST SENSE)
	fSPC2OK               // allowed while another nexus holds an SPC-2 reservation
	fPRAlways             // allowed under any persistent reservation
	fPRRead               // allowed for non-holders of Write Exclusive reservations
	fResv                 // RESERVE/RELEASE: conflicts with any persistent registration
)

// opInfo describes one supported command (or, for commands with service actions, the opcode).
type opInfo struct {
	handler func(*LU, *Command) Result
	cdbLen  uint8
	flags   uint32
}

// cmdDesc is one entry of REPORT SUPPORTED OPERATION CODES.
type cmdDesc struct {
	op      byte
	sa      uint16
	hasSA   bool
	usage   []byte // CDB usage data (bits the device server looks at)
	timeout uint32 // recommended timeout, seconds
}

var opTable [256]opInfo

var cmdDescs = []cmdDesc{
	{op: opTestUnitReady, usage: []byte{0x00, 0, 0, 0, 0, 0}},
	{op: opRequestSense, usage: []byte{0x03, 0x01, 0, 0, 0xFF, 0}},
	{op: opRead6, usage: []byte{0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0}},
	{op: opWrite6, usage: []byte{0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0}},
	{op: opInquiry, usage: []byte{0x12, 0x01, 0xFF, 0xFF, 0xFF, 0}},
	{op: opModeSelect6, usage: []byte{0x15, 0x11, 0, 0, 0xFF, 0}},
	{op: opReserve6, usage: []byte{0x16, 0, 0, 0, 0, 0}},
	{op: opRelease6, usage: []byte{0x17, 0, 0, 0, 0, 0}},
	{op: opModeSense6, usage: []byte{0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0}},
	{op: opStartStopUnit, usage: []byte{0x1B, 0x01, 0, 0x0F, 0xF7, 0}},
	{op: opPreventAllow, usage: []byte{0x1E, 0, 0, 0, 0x03, 0}},
	{op: opReadDefect10, usage: []byte{0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opReadDefect12, usage: []byte{0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}},
	{op: opReadCapacity10, usage: []byte{0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
	{op: opRead10, usage: []byte{0x28, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opWrite10, usage: []byte{0x2A, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opWriteVerify10, usage: []byte{0x2E, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opVerify10, usage: []byte{0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opPrefetch10, usage: []byte{0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opSyncCache10, usage: []byte{0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opWriteSame10, usage: []byte{0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0}},
	{op: opUnmap, usage: []byte{0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0}},
	{op: opLogSense, usage: []byte{0x4D, 0, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opModeSelect10, usage: []byte{0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opReserve10, usage: []byte{0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
	{op: opRelease10, usage: []byte{0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
	{op: opModeSense10, usage: []byte{0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opPRIn, sa: 0x00, hasSA: true, usage: []byte{0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opPRIn, sa: 0x01, hasSA: true, usage: []byte{0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opPRIn, sa: 0x02, hasSA: true, usage: []byte{0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opPRIn, sa: 0x03, hasSA: true, usage: []byte{0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x00, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x01, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x02, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x03, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x04, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x05, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opPROut, sa: 0x06, hasSA: true, usage: []byte{0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0}},
	{op: opRead16, usage: []byte{0x88, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opCompareAndWrite, usage: []byte{0x89, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0x1F, 0}},
	{op: opWrite16, usage: []byte{0x8A, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opOrWrite16, usage: []byte{0x8B, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opWriteVerify16, usage: []byte{0x8E, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opVerify16, usage: []byte{0x8F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opPrefetch16, usage: []byte{0x90, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opSyncCache16, usage: []byte{0x91, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opWriteSame16, usage: []byte{0x93, 0x09, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opWriteAtomic16, usage: []byte{0x9C, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0xFF, 0xFF, 0x1F, 0}},
	{op: opServiceActionIn, sa: saReadCapacity16, hasSA: true, usage: []byte{0x9E, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}},
	{op: opServiceActionIn, sa: saGetLBAStatus, hasSA: true, usage: []byte{0x9E, 0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}},
	{op: opReportLUNs, usage: []byte{0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}},
	{op: opMaintenanceIn, sa: saReportTPG, hasSA: true, usage: []byte{0xA3, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}},
	{op: opMaintenanceIn, sa: saReportSupportOps, hasSA: true, usage: []byte{0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0}},
	{op: opRead12, usage: []byte{0xA8, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opWrite12, usage: []byte{0xAA, 0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opWriteVerify12, usage: []byte{0xAE, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
	{op: opVerify12, usage: []byte{0xAF, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0}},
}

func init() {
	set := func(op byte, h func(*LU, *Command) Result, n uint8, flags uint32) {
		opTable[op] = opInfo{handler: h, cdbLen: n, flags: flags}
	}
	set(opTestUnitReady, (*LU).testUnitReady, 6, fPRAlways)
	set(opRequestSense, (*LU).requestSense, 6, fNoUA|fSPC2OK|fPRAlways)
	set(opRead6, (*LU).readN, 6, fPRRead)
	set(opWrite6, (*LU).writeN, 6, 0)
	set(opInquiry, (*LU).inquiry, 6, fNoUA|fSPC2OK|fPRAlways)
	set(opModeSelect6, (*LU).modeSelect, 6, 0)
	set(opReserve6, (*LU).reserve, 6, fResv)
	set(opRelease6, (*LU).release, 6, fSPC2OK|fResv)
	set(opModeSense6, (*LU).modeSense, 6, 0)
	set(opStartStopUnit, (*LU).startStopUnit, 6, 0)
	set(opPreventAllow, (*LU).preventAllow, 6, 0)
	set(opReadCapacity10, (*LU).readCapacity10, 10, fPRAlways)
	set(opRead10, (*LU).readN, 10, fPRRead)
	set(opWrite10, (*LU).writeN, 10, 0)
	set(opWriteVerify10, (*LU).writeN, 10, 0)
	set(opVerify10, (*LU).verify, 10, fPRRead)
	set(opPrefetch10, (*LU).prefetch, 10, fPRRead)
	set(opSyncCache10, (*LU).syncCache, 10, 0)
	set(opWriteSame10, (*LU).writeSame, 10, 0)
	set(opUnmap, (*LU).unmap, 10, 0)
	set(opModeSelect10, (*LU).modeSelect, 10, 0)
	set(opReserve10, (*LU).reserve, 10, fResv)
	set(opRelease10, (*LU).release, 10, fSPC2OK|fResv)
	set(opModeSense10, (*LU).modeSense, 10, 0)
	set(opLogSense, (*LU).logSense, 10, fPRAlways)
	set(opPRIn, (*LU).prIn, 10, fPRAlways)
	set(opPROut, (*LU).prOut, 10, fPRAlways) // each service action checks its own rights
	set(opRead16, (*LU).readN, 16, fPRRead)
	set(opCompareAndWrite, (*LU).compareAndWrite, 16, 0)
	set(opWrite16, (*LU).writeN, 16, 0)
	set(opOrWrite16, (*LU).orWrite, 16, 0)
	set(opWriteVerify16, (*LU).writeN, 16, 0)
	set(opVerify16, (*LU).verify, 16, fPRRead)
	set(opPrefetch16, (*LU).prefetch, 16, fPRRead)
	set(opSyncCache16, (*LU).syncCache, 16, 0)
	set(opWriteSame16, (*LU).writeSame, 16, 0)
	set(opWriteAtomic16, (*LU).writeN, 16, 0)
	set(opReadDefect10, (*LU).readDefectData, 10, fPRRead)
	set(opReadDefect12, (*LU).readDefectData, 12, fPRRead)
	set(opServiceActionIn, (*LU).serviceActionIn, 16, fPRAlways)
	set(opMaintenanceIn, (*LU).maintenanceIn, 12, fPRAlways|fSPC2OK)
	set(opRead12, (*LU).readN, 12, fPRRead)
	set(opWrite12, (*LU).writeN, 12, 0)
	set(opWriteVerify12, (*LU).writeN, 12, 0)
	set(opVerify12, (*LU).verify, 12, fPRRead)
	for i := range cmdDescs {
		d := &cmdDescs[i]
		d.timeout = 30
		if d.hasSA {
			// SPC-5 6.35.3: the service action code sits where the CDB has it.
			d.usage[1] = d.usage[1]&^0x1F | byte(d.sa)
		}
	}
}

// findDesc returns the REPORT SUPPORTED OPERATION CODES entry for op (and sa when the
// command has service actions); withSA reports whether op has service actions at all.
func findDesc(op byte, sa uint16) (d *cmdDesc, withSA bool) {
	for i := range cmdDescs {
		c := &cmdDescs[i]
		if c.op != op {
			continue
		}
		if !c.hasSA {
			return c, false
		}
		withSA = true
		if c.sa == sa {
			d = c
		}
	}
	return d, withSA
}
