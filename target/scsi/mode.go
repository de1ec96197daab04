package scsi

// Mode pages we keep. Only WCE (caching) and SWP (control) are changeable; everything else is
// fixed and MODE SELECT ignores attempts to change it.
const (
	pageRWRecovery = 0x01
	pageCaching    = 0x08
	pageControl    = 0x0A
	pageIE         = 0x1C
	pageAll        = 0x3F
)

var modePageOrder = []byte{pageRWRecovery, pageCaching, pageControl, pageIE}

// modeState is the changeable part of the mode pages; guarded by LU.mu (data path reads the
// atomics mirrored in LU).
type modeState struct {
	wce bool
	swp bool
}

func defaultModeState(wce bool) modeState { return modeState{wce: wce} }

// Page control values.
const (
	pcCurrent    = 0
	pcChangeable = 1
	pcDefault    = 2
	pcSaved      = 3
)

// modePage renders one page for page control pc.
func (lu *LU) modePage(code byte, pc byte, st modeState) []byte {
	switch code {
	case pageRWRecovery:
		p := make([]byte, 12)
		p[0], p[1] = pageRWRecovery, 0x0A
		if pc != pcChangeable {
			p[2] = 0xC0 // AWRE, ARRE
		}
		return p
	case pageCaching:
		p := make([]byte, 20)
		p[0], p[1] = pageCaching, 0x12
		switch pc {
		case pcChangeable:
			p[2] = 0x04
		case pcDefault:
			if lu.cfg.WriteCache {
				p[2] = 0x04
			}
		default:
			if st.wce {
				p[2] = 0x04
			}
		}
		return p
	case pageControl:
		p := make([]byte, 12)
		p[0], p[1] = pageControl, 0x0A
		switch pc {
		case pcChangeable:
			p[4] = 0x08
		default:
			p[3] = 0x10          // unrestricted reordering allowed
			put16(p[8:], 0xFFFF) // busy timeout period: unlimited
			if pc == pcCurrent && st.swp {
				p[4] = 0x08
			}
		}
		return p
	case pageIE:
		p := make([]byte, 12)
		p[0], p[1] = pageIE, 0x0A
		if pc != pcChangeable {
			p[2] = 0x08 // DEXCPT: no informational exceptions reported
		}
		return p
	}
	return nil
}

func (lu *LU) modeSense(cmd *Command) Result {
	cdb := cmd.CDB
	ten := cdb[0] == opModeSense10
	dbd := cdb[1]&0x08 != 0
	llbaa := ten && cdb[1]&0x10 != 0
	pc := cdb[2] >> 6
	page := cdb[2] & 0x3F
	sub := cdb[3]
	var alloc uint32
	if ten {
		alloc = uint32(be16(cdb[7:9]))
	} else {
		alloc = uint32(cdb[4])
	}
	if pc == pcSaved {
		return illegal(ascSavingNotSupported)
	}
	lu.mu.Lock()
	st := lu.mode
	lu.mu.Unlock()

	hdrLen := 4
	if ten {
		hdrLen = 8
	}
	d := make([]byte, hdrLen, 128)
	devSpec := byte(0x10) // DPOFUA
	if lu.readOnly.Load() || st.swp {
		devSpec |= 0x80
	}
	if !dbd {
		if llbaa {
			var bd [16]byte
			put64(bd[0:], lu.blocks())
			put32(bd[12:], lu.bs)
			d = append(d, bd[:]...)
		} else {
			var bd [8]byte
			n := lu.blocks()
			if n > 0xFFFFFF {
				n = 0xFFFFFF
			}
			if ten {
				n = min(lu.blocks(), 0xFFFFFFFF)
				put32(bd[0:], uint32(n))
			} else {
				bd[1], bd[2], bd[3] = byte(n>>16), byte(n>>8), byte(n)
			}
			bd[5], bd[6], bd[7] = byte(lu.bs>>16), byte(lu.bs>>8), byte(lu.bs)
			d = append(d, bd[:]...)
		}
	}
	bdLen := len(d) - hdrLen
	switch {
	case page == pageAll && (sub == 0x00 || sub == 0xFF):
		for _, p := range modePageOrder {
			d = append(d, lu.modePage(p, pc, st)...)
		}
	case sub != 0 && sub != 0xFF:
		return invalidCDB(3, -1)
	default:
		p := lu.modePage(page, pc, st)
		if p == nil {
			return invalidCDB(2, 5)
		}
		d = append(d, p...)
	}
	if ten {
		put16(d[0:], uint16(len(d)-2))
		d[3] = devSpec
		if llbaa && !dbd {
			d[4] = 0x01
		}
		put16(d[6:], uint16(bdLen))
	} else {
		if len(d)-1 > 0xFF {
			d = d[:256]
		}
		d[0] = byte(len(d) - 1)
		d[2] = devSpec
		d[3] = byte(bdLen)
	}
	return dataIn(cmd, d, alloc)
}

func (lu *LU) modeSelect(cmd *Command) Result {
	cdb := cmd.CDB
	ten := cdb[0] == opModeSelect10
	var plen uint32
	if ten {
		plen = uint32(be16(cdb[7:9]))
	} else {
		plen = uint32(cdb[4])
	}
	if cdb[1]&0x01 != 0 {
		return withWanted(invalidCDB(1, 0), uint64(plen)) // SP: nothing can be saved
	}
	if plen == 0 {
		return good()
	}
	if cdb[1]&0x10 == 0 {
		return withWanted(invalidCDB(1, 4), uint64(plen)) // only page format parameters
	}
	if uint32(len(cmd.DataOut)) < plen {
		return withWanted(paramListLengthError(), uint64(plen))
	}
	data := cmd.DataOut[:plen]
	hdrLen := 4
	if ten {
		hdrLen = 8
	}
	if len(data) < hdrLen {
		return withWanted(paramListLengthError(), uint64(plen))
	}
	var bdLen int
	if ten {
		bdLen = int(be16(data[6:8]))
	} else {
		bdLen = int(data[3])
	}
	pos := hdrLen + bdLen
	if pos > len(data) {
		return withWanted(paramListLengthError(), uint64(plen))
	}
	// Block descriptors may only restate our block length.
	for i := hdrLen; i+8 <= hdrLen+bdLen && !(ten && data[4]&0x01 != 0); i += 8 {
		bl := uint32(data[i+5])<<16 | uint32(data[i+6])<<8 | uint32(data[i+7])
		if bl != 0 && bl != lu.bs {
			return withWanted(invalidParam(i+5, -1), uint64(plen))
		}
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	st := lu.mode
	for pos < len(data) {
		if pos+2 > len(data) {
			return withWanted(paramListLengthError(), uint64(plen))
		}
		code := data[pos] & 0x3F
		spf := data[pos]&0x40 != 0
		var l int
		if spf {
			if pos+4 > len(data) {
				return withWanted(paramListLengthError(), uint64(plen))
			}
			return withWanted(invalidParam(pos, 6), uint64(plen)) // no subpages here
		}
		l = int(data[pos+1]) + 2
		ref := lu.modePage(code, pcCurrent, st)
		if ref == nil {
			return withWanted(invalidParam(pos, 5), uint64(plen))
		}
		if l != len(ref) {
			return withWanted(invalidParam(pos+1, -1), uint64(plen))
		}
		if pos+l > len(data) {
			return withWanted(paramListLengthError(), uint64(plen))
		}
		p := data[pos : pos+l]
		switch code {
		case pageCaching:
			st.wce = p[2]&0x04 != 0
		case pageControl:
			st.swp = p[4]&0x08 != 0
		}
		pos += l
	}
	if st == lu.mode {
		return withWanted(good(), uint64(plen))
	}
	cacheOff := lu.mode.wce && !st.wce
	lu.mode = st
	lu.writeCache.Store(st.wce)
	lu.swp.Store(st.swp)
	lu.addUALocked(ascModeParamsChanged, nexusOf(cmd).ID, nil)
	lu.recomputeGate()
	if cacheOff {
		// Write-through from now on: writes acknowledged while the cache was on (and not yet
		// flushed by the initiator) must be durable before we say so. The store above comes
		// first so every write that skipped its own sync is covered by this one.
		if err := lu.vol.Sync(); err != nil {
			return withWanted(writeError(err), uint64(plen))
		}
	}
	return withWanted(good(), uint64(plen))
}
