package scsi

// VPD page codes.
const (
	vpdSupported   = 0x00
	vpdSerial      = 0x80
	vpdDeviceID    = 0x83
	vpdBlockLimits = 0xB0
	vpdBlockChars  = 0xB1
	vpdLBP         = 0xB2
)

var supportedVPD = []byte{vpdSupported, vpdSerial, vpdDeviceID, vpdBlockLimits, vpdBlockChars, vpdLBP}

// dataIn answers an allocation-length command: data is truncated to alloc (the CDB's
// ALLOCATION LENGTH) and to the transport's buffer. Wanted is what the command itself would
// transfer, so a short answer shows up as an underflow residual.
func dataIn(cmd *Command, data []byte, alloc uint32) Result {
	n := uint32(len(data))
	if n > alloc {
		n = alloc
	}
	c := copy(cmd.DataIn, data[:n])
	return Result{Status: StatusGood, DataInLen: c, Wanted: n}
}

func padASCII(dst []byte, s string) {
	for i := range dst {
		if i < len(s) && s[i] >= 0x20 && s[i] <= 0x7E {
			dst[i] = s[i]
		} else {
			dst[i] = ' '
		}
	}
}

func (lu *LU) inquiry(cmd *Command) Result {
	cdb := cmd.CDB
	evpd := cdb[1]&0x01 != 0
	if cdb[1]&0xFE != 0 {
		return invalidCDB(1, -1)
	}
	page := cdb[2]
	alloc := uint32(be16(cdb[3:5]))
	if !evpd {
		if page != 0 {
			return invalidCDB(2, -1)
		}
		return dataIn(cmd, lu.standardInquiry(), alloc)
	}
	var d []byte
	switch page {
	case vpdSupported:
		d = make([]byte, 4+len(supportedVPD))
		d[1] = vpdSupported
		put16(d[2:], uint16(len(supportedVPD)))
		copy(d[4:], supportedVPD)
	case vpdSerial:
		d = make([]byte, 4+len(lu.serial))
		d[1] = vpdSerial
		put16(d[2:], uint16(len(lu.serial)))
		copy(d[4:], lu.serial)
	case vpdDeviceID:
		d = lu.deviceIDPage(nexusOf(cmd))
	case vpdBlockLimits:
		d = lu.blockLimitsPage()
	case vpdBlockChars:
		d = make([]byte, 64)
		d[1] = vpdBlockChars
		put16(d[2:], 0x3C)
		put16(d[4:], 0x0001) // non-rotating medium
	case vpdLBP:
		d = make([]byte, 8)
		d[1] = vpdLBP
		put16(d[2:], 4)
		// The resource counts of the Logical Block Provisioning log page are in threshold
		// sets of 2^exponent blocks.
		d[4] = lu.thresholdExponent()
		// LBPU, LBPWS, LBPWS10, LBPRZ=001b (unmapped blocks read as zeros).
		d[5] = 0x80 | 0x40 | 0x20 | 0x04
		d[6] = 0x02 // thin provisioned
	default:
		return invalidCDB(2, -1)
	}
	return dataIn(cmd, d, alloc)
}

func (lu *LU) standardInquiry() []byte {
	d := make([]byte, 74)
	d[0] = 0x00 // peripheral qualifier 0, direct access block device
	d[2] = 0x06 // SPC-4
	d[3] = 0x12 // HISUP, response data format 2
	d[4] = byte(len(d) - 5)
	// TPGS=01b, implicit ALUA: REPORT TARGET PORT GROUPS answers (one group, active/optimized)
	// and VPD 0x83 names the group, and SPC-4 allows both only with TPGS non-zero. Linux then
	// attaches its ALUA handler, which finds a single optimized path.
	d[5] = 0x10
	d[6] = 0x00
	d[7] = 0x02 // CMDQUE
	padASCII(d[8:16], lu.cfg.Vendor)
	padASCII(d[16:32], lu.cfg.Product)
	padASCII(d[32:36], "0001")
	// Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
	put16(d[58:], 0x00A0)
	put16(d[60:], 0x0960)
	put16(d[62:], 0x0460)
	put16(d[64:], 0x04C0)
	return d
}

// deviceIDPage: NAA and EUI-64 of the LU (stable: derived from the volume name), a T10
// vendor id with the serial, and the target port's relative id and target port group.
func (lu *LU) deviceIDPage(n *Nexus) []byte {
	d := make([]byte, 4, 128)
	d[1] = vpdDeviceID
	add := func(codeSet, assocType byte, id []byte) {
		first := codeSet
		if assocType&0x80 != 0 {
			first |= 0x50 // protocol identifier iSCSI, valid because PIV is set
		}
		d = append(d, first, assocType, 0, byte(len(id)))
		d = append(d, id...)
	}
	add(0x01, 0x03, lu.naa[:]) // binary, LU association, NAA
	add(0x01, 0x02, lu.eui64[:])
	t10 := make([]byte, 8+len(lu.serial))
	padASCII(t10[:8], lu.cfg.Vendor)
	copy(t10[8:], lu.serial)
	add(0x02, 0x01, t10)
	rel := uint16(1)
	tpg := uint16(1)
	if n != nil {
		if n.RelTargetPortID != 0 {
			rel = n.RelTargetPortID
		}
		if n.TPGT != 0 {
			tpg = n.TPGT
		}
	}
	var port [4]byte
	put16(port[2:], rel)
	add(0x01, 0x80|0x10|0x04, port[:]) // PIV, target port association, relative target port
	var grp [4]byte
	put16(grp[2:], tpg)
	add(0x01, 0x80|0x10|0x05, grp[:]) // target port group
	if n != nil && n.TargetName != "" {
		// SCSI name string of the target port: "<iqn>,t,0x<tpgt>", null padded to 4n.
		name := []byte(n.TargetName + ",t,0x" + hex16(tpg))
		name = append(name, 0)
		for len(name)%4 != 0 {
			name = append(name, 0)
		}
		if len(name) <= 252 {
			add(0x03, 0x80|0x10|0x08, name)
		}
	}
	put16(d[2:], uint16(len(d)-4))
	return d
}

func hex16(v uint16) string {
	const digits = "0123456789abcdef"
	return string([]byte{digits[v>>12&0xF], digits[v>>8&0xF], digits[v>>4&0xF], digits[v&0xF]})
}

func (lu *LU) blockLimitsPage() []byte {
	d := make([]byte, 64)
	d[1] = vpdBlockLimits
	put16(d[2:], 0x3C)
	// WSNZ=0: WRITE SAME with zero blocks runs to the last LBA, within MAXIMUM WRITE SAME LENGTH.
	d[5] = maxCompareAndWrite
	// 4 KiB is the allocation unit of the pool's file system: UNMAP and writes aligned to it
	// avoid partial-page work even though one logical block per physical block is reported.
	gran := uint16(max(1, 4096/lu.bs))
	put16(d[6:], gran)
	put32(d[8:], lu.maxXferBlocks)
	put32(d[12:], optTransferBytes/lu.bs)
	put32(d[16:], lu.maxXferBlocks) // maximum PRE-FETCH length
	put32(d[20:], 0xFFFFFFFF)       // maximum UNMAP LBA count: no limit (hole punching)
	put32(d[24:], maxUnmapDescs)
	put32(d[28:], uint32(gran)) // optimal unmap granularity
	put64(d[36:], uint64(lu.maxWSBlocks))
	put32(d[44:], lu.maxXferBlocks) // maximum atomic transfer length (WRITE ATOMIC 16)
	return d
}

func (lu *LU) testUnitReady(cmd *Command) Result { return good() }

// requestSense: deferred errors are never kept, so there is nothing but NO SENSE to report
// (unit attentions are consumed by the command they are reported on).
func (lu *LU) requestSense(cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[1]&0x01 != 0 {
		return invalidCDB(1, 0) // descriptor format not supported
	}
	alloc := uint32(cdb[4])
	n := nexusOf(cmd)
	code := ascNone
	key := byte(SenseNoSense)
	lu.mu.Lock()
	if ns := lu.nexuses[n.ID]; ns != nil && len(ns.ua) > 0 {
		code = ns.ua[0]
		ns.ua = ns.ua[1:]
		key = SenseUnitAttention
		lu.recomputeGate()
	}
	lu.mu.Unlock()
	return dataIn(cmd, buildSense(key, code, 0, false, noField), alloc)
}

func (lu *LU) readCapacity10(cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[8]&0x01 == 0 && be32(cdb[2:6]) != 0 {
		return invalidCDB(2, -1) // LBA must be zero without PMI
	}
	var d [8]byte
	last := lu.blocks() - 1
	if last > 0xFFFFFFFF {
		last = 0xFFFFFFFF
	}
	put32(d[0:], uint32(last))
	put32(d[4:], lu.bs)
	return dataIn(cmd, d[:], 8)
}

func (lu *LU) serviceActionIn(cmd *Command) Result {
	switch cmd.CDB[1] & 0x1F {
	case saReadCapacity16:
		return lu.readCapacity16(cmd)
	case saGetLBAStatus:
		return lu.getLBAStatus(cmd)
	}
	return invalidCDB(1, 4)
}

func (lu *LU) readCapacity16(cmd *Command) Result {
	cdb := cmd.CDB
	alloc := be32(cdb[10:14])
	var d [32]byte
	put64(d[0:], lu.blocks()-1)
	put32(d[8:], lu.bs)
	d[13] = lu.lbppbe
	d[14] = 0x80 | 0x40 // LBPME, LBPRZ
	return dataIn(cmd, d[:], alloc)
}
