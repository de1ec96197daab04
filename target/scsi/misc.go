package scsi

import "encoding/binary"

func (lu *LU) startStopUnit(cmd *Command) Result {
	cdb := cmd.CDB
	pc := cdb[4] >> 4
	if pc != 0 {
		// Power conditions: nothing to change on a virtual device, but only defined values.
		switch pc {
		case 0x1, 0x2, 0x3, 0x5, 0x7, 0xA, 0xB:
			return good()
		}
		return invalidCDB(4, 7)
	}
	if cdb[4]&0x02 != 0 && cdb[4]&0x01 == 0 {
		// LOEJ with START=0: eject. The medium is not removable.
		return illegal(ascInvalidFieldCDB)
	}
	return good()
}

func (lu *LU) preventAllow(cmd *Command) Result {
	// Not a removable medium: PREVENT is accepted and has no effect (SBC-4 5.15).
	return good()
}

func (lu *LU) maintenanceIn(cmd *Command) Result {
	switch cmd.CDB[1] & 0x1F {
	case saReportSupportOps:
		return lu.reportSupportedOps(cmd)
	case saReportTPG:
		return lu.reportTPG(cmd)
	}
	return invalidCDB(1, 4)
}

// reportTPG: one target port group, active/optimized, with this nexus's target port.
func (lu *LU) reportTPG(cmd *Command) Result {
	cdb := cmd.CDB
	alloc := be32(cdb[6:10])
	ext := cdb[1]>>5 == 1
	n := nexusOf(cmd)
	tpg := uint16(1)
	if n.TPGT != 0 {
		tpg = n.TPGT
	}
	d := make([]byte, 0, 20)
	if ext {
		d = append(d, 0, 0, 0, 0, 0x10, 0, 0, 0)
	} else {
		d = append(d, 0, 0, 0, 0)
	}
	desc := make([]byte, 8)
	desc[0] = 0x80        // PREF; asymmetric access state 0h: active/optimized
	desc[1] = 0x80 | 0x01 // T_SUP (transitioning), AO_SUP
	put16(desc[2:], tpg)
	desc[7] = 1
	d = append(d, desc...)
	var port [4]byte
	put16(port[2:], relPortOf(n))
	d = append(d, port[:]...)
	put32(d[0:], uint32(len(d)-4))
	return dataIn(cmd, d, alloc)
}

func (lu *LU) reportSupportedOps(cmd *Command) Result {
	cdb := cmd.CDB
	rctd := cdb[2]&0x80 != 0
	opts := cdb[2] & 0x07
	reqOp := cdb[3]
	reqSA := be16(cdb[4:6])
	alloc := be32(cdb[6:10])
	if alloc < 4 {
		return invalidCDB(6, -1)
	}
	timeouts := func(d *cmdDesc) []byte {
		var t [12]byte
		put16(t[0:], 0x0A)
		put32(t[8:], d.timeout)
		return t[:]
	}
	switch opts {
	case 0:
		d := make([]byte, 4, 4+len(cmdDescs)*20)
		for i := range cmdDescs {
			c := &cmdDescs[i]
			var e [8]byte
			e[0] = c.op
			put16(e[2:], c.sa)
			if c.hasSA {
				e[5] |= 0x01 // SERVACTV
			}
			if rctd {
				e[5] |= 0x02 // CTDP
			}
			put16(e[6:], uint16(len(c.usage)))
			d = append(d, e[:]...)
			if rctd {
				d = append(d, timeouts(c)...)
			}
		}
		put32(d[0:], uint32(len(d)-4))
		return dataIn(cmd, d, alloc)
	case 1, 2, 3:
		c, withSA := findDesc(reqOp, reqSA)
		switch opts {
		case 1:
			if withSA {
				return invalidCDB(2, 2) // the command has service actions: ask with one
			}
		case 2:
			if c != nil && !withSA {
				return invalidCDB(2, 2) // the command has no service actions
			}
		case 3:
			if c != nil && !withSA && reqSA != 0 {
				c = nil
			}
		}
		d := make([]byte, 4, 4+16+12)
		if c == nil {
			d[1] = 0x01 // not supported
			return dataIn(cmd, d, alloc)
		}
		d[1] = 0x03 // supported, conforming to the standard
		if rctd {
			d[1] |= 0x80
		}
		put16(d[2:], uint16(len(c.usage)))
		d = append(d, c.usage...)
		if rctd {
			d = append(d, timeouts(c)...)
		}
		return dataIn(cmd, d, alloc)
	}
	return invalidCDB(2, 2)
}

// reportLUNs answers REPORT LUNS for the whole device (any LUN may be addressed). It clears
// the nexus's REPORTED LUNS DATA HAS CHANGED unit attention on every LU (SPC-5 6.33).
func (d *Device) reportLUNs(t *lunTable, cmd *Command) Result {
	cdb := cmd.CDB
	if len(cdb) < 12 {
		return invalidCDB(len(cdb), -1)
	}
	alloc := be32(cdb[6:10])
	switch cdb[2] {
	case 0x00, 0x02:
	case 0x01, 0x10, 0x11, 0x12:
		// Only well known LUs, or administrative: we have none.
		out := make([]byte, 8)
		return dataIn(cmd, out, alloc)
	default:
		return invalidCDB(2, -1)
	}
	if alloc < 16 {
		return invalidCDB(6, -1)
	}
	for _, lu := range t.luns {
		lu.clearUA(nexusOf(cmd), ascReportedLUNsChanged)
	}
	luns := t.sorted
	out := make([]byte, 8, 8+8*len(luns))
	for _, l := range luns {
		out = binary.BigEndian.AppendUint64(out, EncodeLUN(l))
	}
	put32(out[0:], uint32(len(out)-8))
	return dataIn(cmd, out, alloc)
}

// noSuchLUN answers commands to a LUN that is not in the map (SPC-5 4.6.4 / 6.7.2).
func noSuchLUN(cmd *Command) Result {
	cdb := cmd.CDB
	switch cdb[0] {
	case opInquiry:
		if len(cdb) < 6 {
			return invalidCDB(len(cdb), -1)
		}
		if cdb[1]&0x01 != 0 {
			return illegal(ascLUNotSupported)
		}
		d := make([]byte, 36)
		d[0] = 0x7F // qualifier 011b: no LU here; device type 1Fh
		d[2] = 0x06
		d[3] = 0x02
		d[4] = 31
		return dataIn(cmd, d, uint32(be16(cdb[3:5])))
	case opRequestSense:
		if len(cdb) < 6 {
			return invalidCDB(len(cdb), -1)
		}
		s := buildSense(SenseIllegalRequest, ascLUNotSupported, 0, false, noField)
		return dataIn(cmd, s, uint32(cdb[4]))
	}
	return illegal(ascLUNotSupported)
}
