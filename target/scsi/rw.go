package scsi

import "bytes"

// rwArgs is a decoded READ/WRITE/VERIFY style CDB.
type rwArgs struct {
	lba    uint64
	blocks uint32
	lenIdx int // CDB byte of the transfer length (for sense field pointers)
}

func decodeRW(cdb []byte) rwArgs {
	switch len16 := cdbSize(cdb[0]); len16 {
	case 6:
		n := uint32(cdb[4])
		if n == 0 {
			n = 256 // READ(6)/WRITE(6): zero means 256 blocks
		}
		return rwArgs{lba: uint64(cdb[1]&0x1F)<<16 | uint64(cdb[2])<<8 | uint64(cdb[3]), blocks: n, lenIdx: 4}
	case 10:
		return rwArgs{lba: uint64(be32(cdb[2:6])), blocks: uint32(be16(cdb[7:9])), lenIdx: 7}
	case 12:
		return rwArgs{lba: uint64(be32(cdb[2:6])), blocks: be32(cdb[6:10]), lenIdx: 6}
	default:
		if cdb[0] == opWriteAtomic16 {
			return rwArgs{lba: be64(cdb[2:10]), blocks: uint32(be16(cdb[12:14])), lenIdx: 12}
		}
		return rwArgs{lba: be64(cdb[2:10]), blocks: be32(cdb[10:14]), lenIdx: 10}
	}
}

// cdbSize is the CDB length implied by the opcode's group code.
func cdbSize(op byte) int {
	switch op >> 5 {
	case 0:
		return 6
	case 1, 2:
		return 10
	case 4:
		return 16
	case 5:
		return 12
	}
	return 16
}

// checkRange validates [lba, lba+blocks) against the medium.
func (lu *LU) checkRange(lba uint64, blocks uint64) bool {
	n := lu.blocks()
	return lba < n && blocks <= n-lba
}

// checkXfer applies the checks every READ/WRITE/VERIFY style command makes before touching the
// medium, in the order SBC-4 reports them: the LBA range, the transfer limit, write protection.
func (lu *LU) checkXfer(a rwArgs, wanted uint64, write bool) (Result, bool) {
	switch {
	case !lu.checkRange(a.lba, uint64(a.blocks)):
		return withWanted(lbaOutOfRange(), wanted), true
	case a.blocks > lu.maxXferBlocks:
		return withWanted(invalidCDB(a.lenIdx, -1), wanted), true
	case write && !lu.writable():
		return withWanted(dataProtect(), wanted), true
	}
	return Result{}, false
}

func (lu *LU) writable() bool { return !lu.readOnly.Load() && !lu.swp.Load() }

// readN serves READ 6/10/12/16 straight into the transport's buffer.
func (lu *LU) readN(cmd *Command) Result {
	cdb := cmd.CDB
	a := decodeRW(cdb)
	if cdb[0] != opRead6 && cdb[1]&0xE0 != 0 {
		return invalidCDB(1, 7) // RDPROTECT: no protection information
	}
	wanted := uint64(a.blocks) * uint64(lu.bs)
	if r, bad := lu.checkXfer(a, wanted, false); bad {
		return r
	}
	n := min(uint64(len(cmd.DataIn)), wanted)
	if n > 0 {
		// Shared side of atomicMu: COMPARE AND WRITE, ORWRITE and WRITE ATOMIC are
		// all-or-nothing to readers as well.
		lu.atomicMu.RLock()
		_, err := lu.vol.ReadAt(cmd.DataIn[:n], int64(a.lba)*int64(lu.bs))
		lu.atomicMu.RUnlock()
		if err != nil {
			return withWanted(readError(), wanted)
		}
	}
	return Result{Status: StatusGood, DataInLen: int(n), Wanted: uint32(wanted)}
}

func withWanted(r Result, wanted uint64) Result {
	if wanted > 0xFFFFFFFF {
		wanted = 0xFFFFFFFF
	}
	r.Wanted = uint32(wanted)
	return r
}

// writeN serves WRITE 6/10/12/16 and WRITE AND VERIFY 10/12/16 straight from the transport's
// buffer. Only the bytes both the CDB and the transport carry are written (a short Data-Out
// leaves the rest of the range untouched).
func (lu *LU) writeN(cmd *Command) Result {
	cdb := cmd.CDB
	a := decodeRW(cdb)
	wanted := uint64(a.blocks) * uint64(lu.bs)
	fua := false
	if cdb[0] != opWrite6 {
		if cdb[1]&0xE0 != 0 {
			return withWanted(invalidCDB(1, 7), wanted) // WRPROTECT
		}
		fua = cdb[1]&0x08 != 0
		switch cdb[0] {
		case opWriteVerify10, opWriteVerify12, opWriteVerify16:
			// BYTCHK 0 and 1 both mean "the medium holds what we wrote": pwrite is
			// synchronous with the page cache, so verification is implicit.
			if cdb[1]&0x06 == 0x04 || cdb[1]&0x06 == 0x06 {
				return withWanted(invalidCDB(1, 2), wanted)
			}
			fua = false
		}
	}
	if r, bad := lu.checkXfer(a, wanted, true); bad {
		return r
	}
	n := min(uint64(len(cmd.DataOut)), wanted)
	if n > 0 {
		var err error
		if cdb[0] == opWriteAtomic16 {
			lu.atomicMu.Lock()
			_, err = lu.vol.WriteAt(cmd.DataOut[:n], int64(a.lba)*int64(lu.bs))
			lu.atomicMu.Unlock()
		} else {
			lu.atomicMu.RLock()
			_, err = lu.vol.WriteAt(cmd.DataOut[:n], int64(a.lba)*int64(lu.bs))
			lu.atomicMu.RUnlock()
		}
		if err != nil {
			return withWanted(writeError(err), wanted)
		}
	}
	if err := lu.durable(fua); err != nil {
		return withWanted(writeError(err), wanted)
	}
	return Result{Status: StatusGood, Wanted: uint32(wanted)}
}

// durable makes a completed write durable when FUA asks for it or no write cache is
// reported (write-through).
func (lu *LU) durable(fua bool) error {
	if fua || !lu.writeCache.Load() {
		return lu.vol.Sync()
	}
	return nil
}

// verify serves VERIFY 10/12/16: BYTCHK 0 checks the range is readable, 1 compares the
// Data-Out with the medium, 3 compares every block with one block of Data-Out.
func (lu *LU) verify(cmd *Command) Result {
	cdb := cmd.CDB
	a := decodeRW(cdb)
	if cdb[1]&0xE0 != 0 {
		return invalidCDB(1, 7) // VRPROTECT
	}
	bytchk := cdb[1] >> 1 & 0x03
	if bytchk == 2 {
		return invalidCDB(1, 2)
	}
	var wanted uint64
	switch bytchk {
	case 1:
		wanted = uint64(a.blocks) * uint64(lu.bs)
	case 3:
		wanted = uint64(lu.bs)
	}
	if r, bad := lu.checkXfer(a, wanted, false); bad {
		return r
	}
	if bytchk == 0 || a.blocks == 0 {
		return withWanted(good(), wanted)
	}
	data := cmd.DataOut
	if uint64(len(data)) < wanted {
		// Not all of the data to compare arrived: we cannot say the medium matches.
		return withWanted(illegal(ascParamListLength), wanted)
	}
	data = data[:wanted]
	off, ok, err := lu.compare(a.lba, uint64(a.blocks), data, bytchk == 3)
	if err != nil {
		return withWanted(readError(), wanted)
	}
	if !ok {
		return withWanted(miscompare(uint32(off)), wanted)
	}
	return withWanted(good(), wanted)
}

// compare reads [lba, lba+blocks) in scratch-sized chunks and compares with data (or, if
// same, with data repeated per block). It returns the offset of the first differing byte.
func (lu *LU) compare(lba, blocks uint64, data []byte, same bool) (uint64, bool, error) {
	bp := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(bp)
	buf := *bp
	chunkBlocks := uint64(len(buf)) / uint64(lu.bs)
	bs := uint64(lu.bs)
	for done := uint64(0); done < blocks; {
		nb := min(chunkBlocks, blocks-done)
		b := buf[:nb*bs]
		if _, err := lu.vol.ReadAt(b, int64((lba+done)*bs)); err != nil {
			return 0, false, err
		}
		for i := uint64(0); i < nb; i++ {
			got := b[i*bs : (i+1)*bs]
			var want []byte
			if same {
				want = data[:bs]
			} else {
				want = data[(done+i)*bs : (done+i+1)*bs]
			}
			if !bytes.Equal(got, want) {
				for j := range got {
					if got[j] != want[j] {
						return (done+i)*bs + uint64(j), false, nil
					}
				}
			}
		}
		done += nb
	}
	return 0, true, nil
}

func (lu *LU) prefetch(cmd *Command) Result {
	a := decodeRW(cmd.CDB)
	if !lu.checkRange(a.lba, uint64(a.blocks)) {
		return lbaOutOfRange()
	}
	// The page cache does the prefetching; CONDITION MET would promise the cache holds it.
	return good()
}

func (lu *LU) syncCache(cmd *Command) Result {
	a := decodeRW(cmd.CDB)
	if a.lba > lu.blocks() || (a.blocks != 0 && !lu.checkRange(a.lba, uint64(a.blocks))) {
		return lbaOutOfRange()
	}
	if err := lu.vol.Sync(); err != nil {
		return writeError(err)
	}
	return good()
}

// compareAndWrite: Data-Out holds the verify blocks then the write blocks; the compare and the
// write happen with every other writer of the LU excluded.
func (lu *LU) compareAndWrite(cmd *Command) Result {
	cdb := cmd.CDB
	lba := be64(cdb[2:10])
	blocks := uint32(cdb[13])
	wanted := 2 * uint64(blocks) * uint64(lu.bs)
	if cdb[1]&0xE0 != 0 {
		return withWanted(invalidCDB(1, 7), wanted)
	}
	if blocks > maxCompareAndWrite {
		return withWanted(invalidCDB(13, -1), wanted)
	}
	if !lu.checkRange(lba, uint64(blocks)) {
		return withWanted(lbaOutOfRange(), wanted)
	}
	// A compare needs exactly its verify and write data: anything else cannot be executed
	// partially, so it is refused (this includes a zero-block CDB sent with data).
	if uint64(cmd.ExpectedLen) != wanted {
		return withWanted(invalidCDB(13, -1), wanted)
	}
	if blocks == 0 {
		return withWanted(good(), wanted)
	}
	if !lu.writable() {
		return withWanted(dataProtect(), wanted)
	}
	if uint64(len(cmd.DataOut)) < wanted {
		return withWanted(invalidDataSize(), wanted)
	}
	half := uint64(blocks) * uint64(lu.bs)
	verifyData := cmd.DataOut[:half]
	writeData := cmd.DataOut[half:wanted]
	lu.atomicMu.Lock()
	defer lu.atomicMu.Unlock()
	off, ok, err := lu.compare(lba, uint64(blocks), verifyData, false)
	if err != nil {
		return withWanted(readError(), wanted)
	}
	if !ok {
		return withWanted(miscompare(uint32(off)), wanted)
	}
	if _, err := lu.vol.WriteAt(writeData, int64(lba)*int64(lu.bs)); err != nil {
		return withWanted(writeError(err), wanted)
	}
	if err := lu.durable(cdb[1]&0x08 != 0); err != nil {
		return withWanted(writeError(err), wanted)
	}
	return withWanted(good(), wanted)
}

// invalidDataSize is INVALID FIELD IN CDB for Data-Out sized differently from what the CDB
// needs, where a partial execution would be wrong.
func invalidDataSize() Result {
	return Result{Status: StatusCheckCondition, Sense: buildSense(SenseIllegalRequest, ascInvalidFieldCDB, 0, false, noField)}
}

// orWrite (ORWRITE 16): medium = medium OR data, atomically per LU.
func (lu *LU) orWrite(cmd *Command) Result {
	cdb := cmd.CDB
	a := decodeRW(cdb)
	wanted := uint64(a.blocks) * uint64(lu.bs)
	if cdb[1]&0xE0 != 0 {
		return withWanted(invalidCDB(1, 7), wanted) // ORPROTECT
	}
	if r, bad := lu.checkXfer(a, wanted, true); bad {
		return r
	}
	n := min(uint64(len(cmd.DataOut)), wanted)
	if n == 0 {
		return withWanted(good(), wanted)
	}
	data := cmd.DataOut[:n]
	bp := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(bp)
	buf := *bp
	base := int64(a.lba) * int64(lu.bs)
	lu.atomicMu.Lock()
	defer lu.atomicMu.Unlock()
	for done := uint64(0); done < n; {
		c := min(uint64(len(buf)), n-done)
		b := buf[:c]
		if _, err := lu.vol.ReadAt(b, base+int64(done)); err != nil {
			return withWanted(readError(), wanted)
		}
		src := data[done : done+c]
		for i := range b {
			b[i] |= src[i]
		}
		if _, err := lu.vol.WriteAt(b, base+int64(done)); err != nil {
			return withWanted(writeError(err), wanted)
		}
		done += c
	}
	if err := lu.durable(cdb[1]&0x08 != 0); err != nil {
		return withWanted(writeError(err), wanted)
	}
	return withWanted(good(), wanted)
}

// writeSame writes the block over the whole range. With the UNMAP bit and an all-zero block
// (or NDOB) the range is deallocated instead: unmapped blocks read as zeros (LBPRZ=1), so the
// result is the same. SBC-4 lets a target deallocate whatever the block holds, but then a
// non-zero pattern reads back as zeros; QEMU and SPDK write it, and so does this.
func (lu *LU) writeSame(cmd *Command) Result {
	cdb := cmd.CDB
	var lba uint64
	var blocks uint32
	ndob := false
	if cdb[0] == opWriteSame10 {
		lba = uint64(be32(cdb[2:6]))
		blocks = uint32(be16(cdb[7:9]))
	} else {
		lba = be64(cdb[2:10])
		blocks = be32(cdb[10:14])
		ndob = cdb[1]&0x01 != 0
	}
	unmapBit := cdb[1]&0x08 != 0
	wanted := uint64(lu.bs)
	if ndob {
		wanted = 0
	}
	if cdb[1]&0xE0 != 0 {
		return withWanted(invalidCDB(1, 7), wanted)
	}
	if cdb[1]&0x10 != 0 {
		return withWanted(invalidCDB(1, 4), wanted) // ANCHOR: anchored state not supported
	}
	if cdb[1]&0x06 != 0 {
		return withWanted(invalidCDB(1, 2), wanted) // PBDATA/LBDATA
	}
	n := uint64(blocks)
	if lba >= lu.blocks() {
		return withWanted(lbaOutOfRange(), wanted)
	}
	if n == 0 {
		// WSNZ=0: zero blocks means through the last LBA (still bounded by the limit).
		n = lu.blocks() - lba
	}
	if !lu.checkRange(lba, n) {
		return withWanted(lbaOutOfRange(), wanted)
	}
	if n > uint64(lu.maxWSBlocks) {
		return withWanted(invalidCDB(lenIdxWS(cdb[0]), -1), wanted)
	}
	if !lu.writable() {
		return withWanted(dataProtect(), wanted)
	}
	var block []byte
	if !ndob {
		// One block of data and nothing else: a different Data-Out size is a broken command.
		if uint64(cmd.ExpectedLen) != wanted || uint64(len(cmd.DataOut)) < wanted {
			return withWanted(invalidDataSize(), wanted)
		}
		block = cmd.DataOut[:lu.bs]
	}
	off := int64(lba) * int64(lu.bs)
	length := int64(n) * int64(lu.bs)
	zero := ndob || allZero(block)
	if unmapBit && zero {
		lu.atomicMu.RLock()
		err := lu.vol.Unmap(off, length)
		lu.atomicMu.RUnlock()
		if err != nil {
			return withWanted(writeError(err), wanted)
		}
		if err := lu.durable(false); err != nil {
			return withWanted(writeError(err), wanted)
		}
		return withWanted(good(), wanted)
	}
	bp := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(bp)
	buf := *bp
	buf = buf[:len(buf)/int(lu.bs)*int(lu.bs)]
	if zero {
		clear(buf)
	} else {
		for i := 0; i < len(buf); i += int(lu.bs) {
			copy(buf[i:], block)
		}
	}
	lu.atomicMu.RLock()
	for done := int64(0); done < length; {
		c := min(int64(len(buf)), length-done)
		if _, err := lu.vol.WriteAt(buf[:c], off+done); err != nil {
			lu.atomicMu.RUnlock()
			return withWanted(writeError(err), wanted)
		}
		done += c
	}
	lu.atomicMu.RUnlock()
	if err := lu.durable(false); err != nil {
		return withWanted(writeError(err), wanted)
	}
	return withWanted(good(), wanted)
}

func lenIdxWS(op byte) int {
	if op == opWriteSame10 {
		return 7
	}
	return 10
}

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if b[0]|b[1]|b[2]|b[3]|b[4]|b[5]|b[6]|b[7] != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// unmap parses the UNMAP parameter list and punches every described range. All descriptors
// are validated before any is applied.
func (lu *LU) unmap(cmd *Command) Result {
	cdb := cmd.CDB
	plen := uint32(be16(cdb[7:9]))
	if cdb[1]&0x01 != 0 {
		return withWanted(invalidCDB(1, 0), uint64(plen)) // ANCHOR
	}
	if plen == 0 {
		return good()
	}
	if plen < 8 {
		return withWanted(paramListLengthError(), uint64(plen))
	}
	if !lu.writable() {
		return withWanted(dataProtect(), uint64(plen))
	}
	data := cmd.DataOut
	if uint32(len(data)) < plen {
		return withWanted(paramListLengthError(), uint64(plen))
	}
	data = data[:plen]
	// The UNMAP DATA LENGTH (bytes 0-1) is redundant with the descriptor length; only the
	// latter decides what is parsed.
	bdlen := uint32(be16(data[2:4]))
	if bdlen%16 != 0 {
		return withWanted(invalidParam(2, -1), uint64(plen))
	}
	if 8+bdlen > plen {
		bdlen = (plen - 8) / 16 * 16
	}
	nd := bdlen / 16
	if nd > maxUnmapDescs {
		return withWanted(invalidParam(2, -1), uint64(plen))
	}
	descs := data[8 : 8+bdlen]
	for i := uint32(0); i < nd; i++ {
		d := descs[i*16:]
		lba := be64(d[0:8])
		n := uint64(be32(d[8:12]))
		if n == 0 {
			if lba > lu.blocks() {
				return withWanted(lbaOutOfRange(), uint64(plen))
			}
			continue
		}
		if !lu.checkRange(lba, n) {
			return withWanted(lbaOutOfRange(), uint64(plen))
		}
	}
	lu.atomicMu.RLock()
	defer lu.atomicMu.RUnlock()
	for i := uint32(0); i < nd; i++ {
		d := descs[i*16:]
		lba := be64(d[0:8])
		n := uint64(be32(d[8:12]))
		if n == 0 {
			continue
		}
		if err := lu.vol.Unmap(int64(lba)*int64(lu.bs), int64(n)*int64(lu.bs)); err != nil {
			return withWanted(writeError(err), uint64(plen))
		}
	}
	// Write-through: deallocation is a change of the medium like any write.
	if err := lu.durable(false); err != nil {
		return withWanted(writeError(err), uint64(plen))
	}
	return withWanted(good(), uint64(plen))
}

// getLBAStatus answers from the volume's SEEK_DATA/SEEK_HOLE view, one descriptor per run.
func (lu *LU) getLBAStatus(cmd *Command) Result {
	cdb := cmd.CDB
	lba := be64(cdb[2:10])
	alloc := be32(cdb[10:14])
	if lba >= lu.blocks() {
		return lbaOutOfRange()
	}
	if alloc < 8 {
		return withWanted(good(), 0)
	}
	maxDescs := (min(alloc, 4096) - 8) / 16
	if maxDescs == 0 {
		maxDescs = 1
	}
	d := make([]byte, 8, 8+16*maxDescs)
	bs := uint64(lu.bs)
	cur := lba
	for uint32((len(d)-8)/16) < maxDescs && cur < lu.blocks() {
		mapped, length, err := lu.vol.Mapped(int64(cur * bs))
		if err != nil {
			return readError()
		}
		var n uint64
		if mapped {
			n = (uint64(length) + bs - 1) / bs
		} else {
			n = uint64(length) / bs
			if n == 0 {
				mapped, n = true, 1
			}
		}
		n = min(n, lu.blocks()-cur, 0xFFFFFFFF)
		if n == 0 {
			n = 1
		}
		var desc [16]byte
		put64(desc[0:], cur)
		put32(desc[8:], uint32(n))
		if !mapped {
			desc[12] = 0x01 // deallocated
		}
		d = append(d, desc[:]...)
		cur += n
	}
	put32(d[0:], uint32(len(d)-4))
	return dataIn(cmd, d, alloc)
}

// readDefectData: a virtual medium has no defects; the list is empty in the format asked for.
func (lu *LU) readDefectData(cmd *Command) Result {
	cdb := cmd.CDB
	if cdb[0] == opReadDefect10 {
		alloc := uint32(be16(cdb[7:9]))
		d := []byte{0, cdb[2] & 0x1F, 0, 0}
		return dataIn(cmd, d, alloc)
	}
	alloc := be32(cdb[6:10])
	d := []byte{0, cdb[1] & 0x1F, 0, 0, 0, 0, 0, 0}
	return dataIn(cmd, d, alloc)
}
