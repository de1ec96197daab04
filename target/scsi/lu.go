package scsi

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"nstarget/backend"
)

// Limits advertised in the Block Limits VPD page and enforced by the commands.
const (
	maxTransferBytes   = 8 << 20  // largest READ/WRITE/VERIFY a single command may move
	optTransferBytes   = 1 << 20  // what initiators should aim for
	maxWriteSameBytes  = 64 << 20 // largest non-unmapping WRITE SAME (real writes)
	maxUnmapDescs      = 256      // UNMAP block descriptors per command
	maxCompareAndWrite = 255      // blocks per COMPARE AND WRITE (CDB field is one byte)
	scratchBytes       = 256 << 10
)

// LU is one logical unit backed by one volume. Safe for concurrent use.
type LU struct {
	vol backend.Volume
	cfg LUConfig
	bs  uint32
	// nblocks grows when the volume does (Resized); read it once per command with blocks().
	nblocks atomic.Uint64

	naa    [8]byte // NAA 3 (locally assigned) designator
	eui64  [8]byte
	serial string

	lbppbe        byte // log2(logical blocks per physical block) reported by READ CAPACITY 16
	maxXferBlocks uint32
	maxWSBlocks   uint32

	// atomicMu serialises the read-modify-write commands (COMPARE AND WRITE, ORWRITE) against
	// every writer: plain writes take it shared, so they never interleave with a compare.
	atomicMu sync.RWMutex

	// gate is non-zero while any nexus has a pending unit attention or any reservation or
	// registration exists; the hot path checks only this before touching mu.
	gate atomic.Int32

	// writeCache / swp mirror the mode pages so the data path reads them without mu;
	// readOnly is the configuration's read_only, changed live by SetReadOnly.
	writeCache atomic.Bool
	swp        atomic.Bool
	readOnly   atomic.Bool

	// known is a copy-on-write snapshot of the nexus IDs that have state here, so the hot
	// path neither takes mu nor allocates.
	known atomic.Pointer[map[uint64]struct{}]

	// mu guards the state below; the gate check takes it shared when it only reads, so
	// sessions sharing a reserved LU (clusters) do not serialise on it.
	mu      sync.RWMutex
	nexuses map[uint64]*nexusState // by Nexus.ID
	resv2   *Nexus                 // SPC-2 RESERVE holder (nil: none)
	resv2ID uint64
	pr      prState
	mode    modeState

	// prStore keeps pr through restarts while APTPL is in effect; nil if the volume's backend
	// has no state store (APTPL is then refused).
	prStore backend.StateStore
}

// nexusState is per-I_T-nexus state kept by an LU.
type nexusState struct {
	nexus *Nexus
	port  string // portOf(nexus), computed once: the PR check runs on every command while
	// registrations exist and must not allocate
	ua []asc
}

var scratchPool = sync.Pool{New: func() any { b := make([]byte, scratchBytes); return &b }}

// NewLU makes a logical unit on vol. Device identifiers (VPD 0x80/0x83) derive from the volume
// and its pool's identity (identitySeed), never from the tenant's network, so they are stable
// across restarts, reloads and addresses.
func NewLU(vol backend.Volume, cfg LUConfig) (*LU, error) {
	if vol == nil {
		return nil, errors.New("scsi: NewLU: nil volume")
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = 512
	}
	switch cfg.BlockSize {
	case 512, 1024, 2048, 4096:
	default:
		return nil, fmt.Errorf("scsi: volume %q: block size %d not one of 512, 1024, 2048, 4096", vol.Name(), cfg.BlockSize)
	}
	if vol.Size() < int64(cfg.BlockSize) {
		return nil, fmt.Errorf("scsi: volume %q: size %d smaller than one block", vol.Name(), vol.Size())
	}
	if cfg.Vendor == "" {
		cfg.Vendor = "NSTARGET"
	}
	if cfg.Product == "" {
		cfg.Product = "VOLUME"
	}
	lu := &LU{
		vol:     vol,
		cfg:     cfg,
		bs:      cfg.BlockSize,
		nexuses: make(map[uint64]*nexusState),
	}
	lu.nblocks.Store(uint64(vol.Size()) / uint64(cfg.BlockSize))
	lu.readOnly.Store(cfg.ReadOnly)
	// One logical block per physical block is reported even though the file system under
	// the pool allocates 4 KiB: GET LBA STATUS then answers for exactly the LBA asked
	// (libiscsi's GetLBAStatus.UnmapSingle assumes that), and unaligned UNMAPs still read back
	// as zeros because hole punching zeroes partial blocks.
	lu.lbppbe = 0
	lu.maxXferBlocks = maxTransferBytes / cfg.BlockSize
	lu.maxWSBlocks = min(0xFFFF, maxWriteSameBytes/cfg.BlockSize)
	sum := sha256.Sum256([]byte(identitySeed(vol)))
	// NAA 3: locally assigned, 60 bits of the hash.
	copy(lu.naa[:], sum[:8])
	lu.naa[0] = 0x30 | (lu.naa[0] & 0x0F)
	copy(lu.eui64[:], sum[8:16])
	lu.serial = cfg.Serial
	if lu.serial == "" {
		lu.serial = fmt.Sprintf("%x", sum[:12])
	}
	lu.serial = sanitizeASCII(lu.serial, 64)
	lu.writeCache.Store(cfg.WriteCache)
	lu.mode = defaultModeState(cfg.WriteCache)
	lu.prStore = prStoreOf(vol)
	if err := lu.loadPR(); err != nil {
		return nil, err
	}
	return lu, nil
}

// identitySeed is what the NAA, EUI-64 and serial are hashed from. With the pool's random
// identity in it, two appliances whose pools hold volumes of the same name present different
// disks, so multipath on a host attached to both never merges them. A volume without a pool
// identity (another backend, a test double) falls back to the name alone.
func identitySeed(vol backend.Volume) string {
	if id, ok := vol.(backend.Identified); ok {
		return "nstarget-volume:" + id.PoolID().String() + ":" + vol.Name()
	}
	return "nstarget-volume:" + vol.Name()
}

// sanitizeASCII keeps printable ASCII (SPC-5 4.3.1) and trims to max bytes.
func sanitizeASCII(s string, max int) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < max; i++ {
		c := s[i]
		if c < 0x20 || c > 0x7E {
			c = '_'
		}
		b.WriteByte(c)
	}
	return b.String()
}

// recomputeGate must be called with mu held after any change to UAs or reservations.
func (lu *LU) recomputeGate() {
	var g int32
	if lu.resv2 != nil || lu.pr.active() {
		g = 1
	}
	if g == 0 {
		for _, ns := range lu.nexuses {
			if len(ns.ua) > 0 {
				g = 1
				break
			}
		}
	}
	lu.gate.Store(g)
}

// publishKnownLocked replaces the known-nexus snapshot; mu must be held.
func (lu *LU) publishKnownLocked() {
	m := make(map[uint64]struct{}, len(lu.nexuses))
	for id := range lu.nexuses {
		m[id] = struct{}{}
	}
	lu.known.Store(&m)
}

// nexusStateLocked returns (creating) the state for n; mu must be held.
func (lu *LU) nexusStateLocked(n *Nexus) *nexusState {
	ns := lu.nexuses[n.ID]
	if ns == nil {
		ns = &nexusState{nexus: n, port: portOf(n)}
		lu.nexuses[n.ID] = ns
		lu.publishKnownLocked()
	} else {
		ns.nexus = n
	}
	return ns
}

// addUALocked queues a unit attention for every known nexus except skip (0: none).
func (lu *LU) addUALocked(code asc, skipID uint64, only func(*Nexus) bool) {
	for id, ns := range lu.nexuses {
		if id == skipID && skipID != 0 {
			continue
		}
		if only != nil && !only(ns.nexus) {
			continue
		}
		if len(ns.ua) >= 8 || slices.Contains(ns.ua, code) {
			continue
		}
		ns.ua = append(ns.ua, code)
	}
}

// addUAFor queues a unit attention for each of the given nexuses, whether or not they have
// addressed this LU yet.
func (lu *LU) addUAFor(code asc, nexuses map[uint64]*Nexus) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	for _, n := range nexuses {
		lu.nexusStateLocked(n)
	}
	lu.addUALocked(code, 0, func(n *Nexus) bool { return nexuses[n.ID] != nil })
	lu.recomputeGate()
}

// addUA queues a unit attention for every nexus that has addressed this LU.
func (lu *LU) addUA(code asc) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	lu.addUALocked(code, 0, nil)
	lu.recomputeGate()
}

// clearUA drops a pending unit attention of n, if any.
func (lu *LU) clearUA(n *Nexus, code asc) {
	if lu.gate.Load() == 0 {
		return
	}
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if ns := lu.nexuses[n.ID]; ns != nil {
		if i := slices.Index(ns.ua, code); i >= 0 {
			ns.ua = slices.Delete(ns.ua, i, i+1)
			lu.recomputeGate()
		}
	}
}

// blocks is the LU's current capacity in logical blocks.
func (lu *LU) blocks() uint64 { return lu.nblocks.Load() }

// Resized takes the LU's capacity from its volume again after the volume grew, and tells
// every nexus CAPACITY DATA HAS CHANGED. It reports whether the capacity changed; a volume
// never shrinks under an LU.
func (lu *LU) Resized() bool {
	n := uint64(lu.vol.Size()) / uint64(lu.bs)
	for {
		cur := lu.nblocks.Load()
		if n <= cur {
			return false
		}
		if lu.nblocks.CompareAndSwap(cur, n) {
			break
		}
	}
	lu.addUA(ascCapacityChanged)
	return true
}

// SetReadOnly changes the LU's read_only setting while it serves; nexuses are told MODE
// PARAMETERS CHANGED (the WP bit of MODE SENSE changes). Writes already executing finish.
func (lu *LU) SetReadOnly(ro bool) {
	if lu.readOnly.Swap(ro) != ro {
		lu.addUA(ascModeParamsChanged)
	}
}

// SetWriteCache changes whether the LU reports a volatile write cache while it serves, as
// MODE SELECT of the caching page would. Turning it off syncs the volume first, so that
// writes acknowledged while it was on are durable before the LU says it has none.
func (lu *LU) SetWriteCache(on bool) error {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.mode.wce == on {
		return nil
	}
	lu.mode.wce = on
	lu.writeCache.Store(on)
	lu.addUALocked(ascModeParamsChanged, 0, nil)
	lu.recomputeGate()
	if !on {
		if err := lu.vol.Sync(); err != nil {
			return fmt.Errorf("scsi: volume %q: sync before disabling the write cache: %w", lu.vol.Name(), err)
		}
	}
	return nil
}

// ThresholdReached tells every nexus THIN PROVISIONING SOFT THRESHOLD REACHED: the pool under
// the LU's volume has crossed the operator's threshold.
func (lu *LU) ThresholdReached() { lu.addUA(ascSoftThresholdReached) }

// Volume is the volume the LU serves.
func (lu *LU) Volume() backend.Volume { return lu.vol }

// reset implements LOGICAL UNIT RESET: SPC-2 reservations go, persistent ones stay, every
// nexus sees a reset unit attention.
// The nexus that asked for the reset knows about it and gets no unit attention.
func (lu *LU) reset(by *Nexus) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	lu.resv2 = nil
	lu.resv2ID = 0
	skip := uint64(0)
	if by != nil {
		skip = by.ID
	}
	lu.addUALocked(ascPowerOnReset, skip, nil)
	lu.recomputeGate()
}

func (lu *LU) nexusLoss(n *Nexus) {
	lu.mu.Lock()
	defer lu.mu.Unlock()
	if lu.resv2 != nil && lu.resv2ID == n.ID {
		lu.resv2 = nil
		lu.resv2ID = 0
	}
	delete(lu.nexuses, n.ID)
	lu.publishKnownLocked()
	lu.recomputeGate()
}

// nexusOf tolerates a nil nexus (tests, internal callers): all such commands share ID 0.
func nexusOf(cmd *Command) *Nexus {
	if cmd.Nexus != nil {
		return cmd.Nexus
	}
	return &anonNexus
}

var anonNexus = Nexus{ID: 0, InitiatorName: "anonymous"}

// execute is the LU entry point: CDB length check, unit attention and reservation gates, then
// the command itself.
func (lu *LU) execute(cmd *Command) Result {
	cdb := cmd.CDB
	info := &opTable[cdb[0]]
	if info.handler == nil {
		return invalidOpcode()
	}
	if len(cdb) < int(info.cdbLen) {
		return invalidCDB(len(cdb), -1)
	}
	if lu.gate.Load() != 0 || !lu.knowsNexus(cmd) {
		if r, stop := lu.gateCheck(cmd, info); stop {
			return r
		}
	}
	return info.handler(lu, cmd)
}

// knowsNexus caches whether a nexus has state here; new nexuses take the slow path once so
// they get registered for unit attentions.
func (lu *LU) knowsNexus(cmd *Command) bool {
	m := lu.known.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[nexusOf(cmd).ID]
	return ok
}

// gateCheck reports a pending unit attention or a reservation conflict for cmd.
func (lu *LU) gateCheck(cmd *Command, info *opInfo) (Result, bool) {
	n := nexusOf(cmd)
	lu.mu.RLock()
	if ns := lu.nexuses[n.ID]; ns != nil && (len(ns.ua) == 0 || info.flags&fNoUA != 0) {
		// Known nexus with no unit attention to consume: a read-only check.
		conflict := lu.reservationConflictLocked(n, ns, info, cmd.CDB)
		lu.mu.RUnlock()
		if conflict {
			return reservationConflict(), true
		}
		return Result{}, false
	}
	lu.mu.RUnlock()
	lu.mu.Lock()
	defer lu.mu.Unlock()
	ns := lu.nexusStateLocked(n)
	if len(ns.ua) > 0 && info.flags&fNoUA == 0 {
		code := ns.ua[0]
		ns.ua = ns.ua[1:]
		lu.recomputeGate()
		return checkCond(SenseUnitAttention, code), true
	}
	if lu.reservationConflictLocked(n, ns, info, cmd.CDB) {
		return reservationConflict(), true
	}
	return Result{}, false
}

// reservationConflictLocked applies the SPC-2 and persistent reservation rules; mu must be
// held (shared is enough).
func (lu *LU) reservationConflictLocked(n *Nexus, ns *nexusState, info *opInfo, cdb []byte) bool {
	if lu.resv2 != nil && lu.resv2ID != n.ID && info.flags&fSPC2OK == 0 {
		return true
	}
	return lu.pr.conflicts(ns.port, info.flags, cdb)
}

func be16(b []byte) uint16     { return binary.BigEndian.Uint16(b) }
func be32(b []byte) uint32     { return binary.BigEndian.Uint32(b) }
func be64(b []byte) uint64     { return binary.BigEndian.Uint64(b) }
func put16(b []byte, v uint16) { binary.BigEndian.PutUint16(b, v) }
func put32(b []byte, v uint32) { binary.BigEndian.PutUint32(b, v) }
func put64(b []byte, v uint64) { binary.BigEndian.PutUint64(b, v) }
