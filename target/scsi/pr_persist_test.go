//go:build linux

package scsi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"

	"nstarget/backend"
)

// A nexus of the same initiator ports as nexusA/nexusB, as a login after a restart makes it:
// same name and ISID, a new nexus ID.
var (
	nexusA2 = &Nexus{ID: 11, InitiatorName: nexusA.InitiatorName, ISID: nexusA.ISID, TargetName: nexusA.TargetName, RelTargetPortID: 1, TPGT: 1}
	nexusB2 = &Nexus{ID: 12, InitiatorName: nexusB.InitiatorName, ISID: nexusB.ISID, TargetName: nexusB.TargetName, RelTargetPortID: 1, TPGT: 1}
)

// openPooledLU opens volume "lu0" of the pool at dir as a server start does and returns the LU;
// the pool closes when the test ends (or earlier through the returned func, a "restart").
func openPooledLU(t *testing.T, dir string) (*fixture, func()) {
	t.Helper()
	pool, err := backend.OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	vol, err := pool.Open("lu0", int64(testBlocks)*512)
	if err != nil {
		t.Fatal(err)
	}
	lu, err := NewLU(vol, LUConfig{})
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{t: t, dev: NewDevice(map[uint64]*LU{0: lu}), lu: lu}, func() { pool.Close() }
}

func (f *fixture) prOutAPTPL(n *Nexus, sa, typ byte, key, sark uint64, aptpl bool) Result {
	c, p := prOut(sa, typ, key, sark)
	if aptpl {
		p[20] |= 0x01
	}
	r, _ := f.run(n, c, p, 24)
	return r
}

// readKeys returns the PR generation and the registered keys.
func (f *fixture) readKeys(n *Nexus) (uint32, []uint64) {
	f.t.Helper()
	r, d := f.run(n, []byte{opPRIn, 0, 0, 0, 0, 0, 0, 0x10, 0, 0}, nil, 0x1000)
	f.expectGood(r, "READ KEYS")
	var keys []uint64
	for i := 8; i+8 <= len(d); i += 8 {
		keys = append(keys, binary.BigEndian.Uint64(d[i:]))
	}
	return binary.BigEndian.Uint32(d), keys
}

// readReservation returns the holder's key and the type (0, 0: none).
func (f *fixture) readReservation(n *Nexus) (uint64, byte) {
	f.t.Helper()
	r, d := f.run(n, []byte{opPRIn, 1, 0, 0, 0, 0, 0, 0, 24, 0}, nil, 24)
	f.expectGood(r, "READ RESERVATION")
	if binary.BigEndian.Uint32(d[4:]) == 0 {
		return 0, 0
	}
	return binary.BigEndian.Uint64(d[8:]), d[21] & 0x0F
}

// capabilities returns PTPL_C and PTPL_A of REPORT CAPABILITIES.
func (f *fixture) capabilities(n *Nexus) (ptplC, ptplA bool) {
	f.t.Helper()
	r, d := f.run(n, []byte{opPRIn, 2, 0, 0, 0, 0, 0, 0, 8, 0}, nil, 8)
	f.expectGood(r, "REPORT CAPABILITIES")
	return d[2]&0x01 != 0, d[3]&0x01 != 0
}

func TestAPTPLRegistrationsAndReservationSurviveARestart(t *testing.T) {
	dir := t.TempDir()
	f, restart := openPooledLU(t, dir)
	f.expectGood(f.prOutAPTPL(nexusA, saRegister, 0, 0, 0xA, true), "register A with APTPL")
	f.expectGood(f.prOutAPTPL(nexusB, saRegisterIgnore, 0, 0, 0xB, true), "register B with APTPL")
	f.expectGood(f.prOutAPTPL(nexusA, saReserve, prWERO, 0xA, 0, false), "reserve WE-RO")
	gen, _ := f.readKeys(nexusA)
	if c, a := f.capabilities(nexusA); !c || !a {
		t.Fatalf("REPORT CAPABILITIES: PTPL_C=%v PTPL_A=%v, want both", c, a)
	}
	restart()

	g, _ := openPooledLU(t, dir)
	gen2, keys := g.readKeys(nexusA2)
	if gen2 != gen || len(keys) != 2 || keys[0] != 0xA || keys[1] != 0xB {
		t.Fatalf("after restart: generation %d keys %x, want %d [a b]", gen2, keys, gen)
	}
	if key, typ := g.readReservation(nexusA2); key != 0xA || typ != prWERO {
		t.Fatalf("after restart: reservation key %#x type %#x, want 0xa WE-RO", key, typ)
	}
	if _, a := g.capabilities(nexusA2); !a {
		t.Fatal("after restart: PTPL_A is clear")
	}
	// The restored state is enforced for nexuses that log in later, matched by name + ISID.
	g.expectGood(first(g.run(nexusA2, write10(0, 1, 0), make([]byte, 512), 512)), "holder write after restart")
	g.expectGood(first(g.run(nexusB2, write10(0, 1, 0), make([]byte, 512), 512)), "registrant write under WE-RO after restart")
	if r, _ := g.run(nexusC, write10(0, 1, 0), make([]byte, 512), 512); r.Status != StatusReservationConflict {
		t.Fatalf("unregistered write after restart: status %#x, want RESERVATION CONFLICT", r.Status)
	}
	// And it can be changed and released as if nothing happened.
	g.expectGood(g.prOutAPTPL(nexusA2, saRelease, prWERO, 0xA, 0, false), "release by the restored holder")
}

func TestWithoutAPTPLNothingSurvivesARestart(t *testing.T) {
	dir := t.TempDir()
	f, restart := openPooledLU(t, dir)
	f.expectGood(f.prOutAPTPL(nexusA, saRegister, 0, 0, 0xA, false), "register without APTPL")
	f.expectGood(f.prOutAPTPL(nexusA, saReserve, prWE, 0xA, 0, false), "reserve")
	if _, a := f.capabilities(nexusA); a {
		t.Fatal("PTPL_A set without APTPL")
	}
	restart()
	g, _ := openPooledLU(t, dir)
	if _, keys := g.readKeys(nexusA2); len(keys) != 0 {
		t.Fatalf("keys %x survived a restart without APTPL", keys)
	}
	if _, typ := g.readReservation(nexusA2); typ != 0 {
		t.Fatalf("reservation type %#x survived a restart without APTPL", typ)
	}
}

func TestWithdrawingAPTPLForgetsTheSavedState(t *testing.T) {
	dir := t.TempDir()
	f, restart := openPooledLU(t, dir)
	f.expectGood(f.prOutAPTPL(nexusA, saRegister, 0, 0, 0xA, true), "register with APTPL")
	f.expectGood(f.prOutAPTPL(nexusB, saRegister, 0, 0, 0xB, true), "register B with APTPL")
	// The last valid APTPL bit decides (SPC-5 5.14.5): re-registering with APTPL=0 withdraws it.
	f.expectGood(f.prOutAPTPL(nexusA, saRegister, 0, 0xA, 0xA, false), "re-register without APTPL")
	restart()
	g, _ := openPooledLU(t, dir)
	if _, keys := g.readKeys(nexusA2); len(keys) != 0 {
		t.Fatalf("keys %x survived after APTPL was withdrawn", keys)
	}
}

func TestClearUnderAPTPLLeavesNothingToRestore(t *testing.T) {
	dir := t.TempDir()
	f, restart := openPooledLU(t, dir)
	f.expectGood(f.prOutAPTPL(nexusA, saRegister, 0, 0, 0xA, true), "register with APTPL")
	f.expectGood(f.prOutAPTPL(nexusA, saReserve, prEA, 0xA, 0, false), "reserve EA")
	f.expectGood(f.prOutAPTPL(nexusA, saClear, 0, 0xA, 0, false), "clear")
	restart()
	g, _ := openPooledLU(t, dir)
	if _, keys := g.readKeys(nexusA2); len(keys) != 0 {
		t.Fatalf("keys %x came back after CLEAR", keys)
	}
	g.expectGood(first(g.run(nexusC, write10(0, 1, 0), make([]byte, 512), 512)), "write after CLEAR and restart")
}

func TestAPTPLIsRefusedWhereStateCannotBeKept(t *testing.T) {
	f := newFixture(t, LUConfig{}) // its volume wrapper offers no state store
	f.t = t
	c, p := prOut(saRegister, 0, 0, 0xA)
	p[20] |= 0x01
	r, _ := f.run(nexusA, c, p, 24)
	f.expectSense(r, SenseIllegalRequest, ascInvalidFieldParam, "APTPL without a state store")
	if c, _ := f.capabilities(nexusA); c {
		t.Fatal("PTPL_C set without a state store")
	}
}

// failingStore is a volume whose state store cannot save (a full or broken disk).
type failingStore struct{ backend.Volume }

func (failingStore) LoadState(string) ([]byte, error) { return nil, nil }
func (failingStore) SaveState(string, []byte) error   { return errors.New("disk on fire") }

func TestAFailedSaveUndoesTheChangeAndSaysSo(t *testing.T) {
	base := newFixture(t, LUConfig{})
	lu, err := NewLU(failingStore{base.vol}, LUConfig{})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{t: t, dev: NewDevice(map[uint64]*LU{0: lu}), lu: lu}
	f.expectGood(f.prOutAPTPL(nexusA, saRegister, 0, 0, 0xA, false), "register without APTPL (nothing to save)")
	gen, _ := f.readKeys(nexusA)
	f.expectSense(f.prOutAPTPL(nexusB, saRegister, 0, 0, 0xB, true), SenseIllegalRequest, ascInsufficientRegistrationResources, "register with APTPL, save fails")
	gen2, keys := f.readKeys(nexusA)
	if gen2 != gen || len(keys) != 1 || keys[0] != 0xA {
		t.Fatalf("after the failed save: generation %d keys %x, want %d [a]", gen2, keys, gen)
	}
	if _, a := f.capabilities(nexusA); a {
		t.Fatal("PTPL_A set although the save failed")
	}
}

func TestDamagedSavedStateStopsTheLUFromOpening(t *testing.T) {
	pool, err := backend.OpenPool(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	vol, err := pool.Open("lu0", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{
		`{"version":1,"generation":1,"type":1,"holder":"nobody","registrations":[]}`,
		`{"version":1,"registrations":[{"initiator":"iqn.x","isid":"zz","key":"0x1"}]}`,
		`{"version":1,"registrations":[{"initiator":"iqn.x","isid":"800000000001","key":"0"}]}`,
		`{"version":9,"registrations":[]}`,
		`not json`,
	} {
		if err := vol.(backend.StateStore).SaveState(prStateKey, []byte(bad)); err != nil {
			t.Fatal(err)
		}
		if _, err := NewLU(vol, LUConfig{}); err == nil {
			t.Errorf("NewLU accepted saved state %s", bad)
		}
	}
}

func TestSavedStateRoundTrips(t *testing.T) {
	p := prState{generation: 7, typ: prEAAR, aptpl: true}
	for _, n := range []*Nexus{nexusA, nexusB} {
		p.regs = append(p.regs, &registrant{port: portOf(n), initiator: n.InitiatorName, isid: n.ISID, relPort: 1, key: 0xFFFF_FFFF_FFFF_FFF0 + n.ID})
	}
	p.holder = p.regs[1]
	b, err := p.encode()
	if err != nil {
		t.Fatal(err)
	}
	q, err := decodePRState(b)
	if err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	if !samePR(&p, &q) {
		t.Fatalf("round trip changed the state:\n%s", b)
	}
}

func TestConcurrentAPTPLChangesLeaveTheLastStateOnDisk(t *testing.T) {
	dir := t.TempDir()
	f, restart := openPooledLU(t, dir)
	nexuses := make([]*Nexus, 8)
	var wg sync.WaitGroup
	for i := range nexuses {
		nexuses[i] = &Nexus{ID: uint64(100 + i), InitiatorName: fmt.Sprintf("iqn.2026-01.test:n%d", i), ISID: [6]byte{0x80, 0, 0, 0, 0, byte(i)}, RelTargetPortID: 1, TPGT: 1}
		wg.Add(1)
		go func(n *Nexus, key uint64) {
			defer wg.Done()
			// Register, change the key a few times, and (for odd ones) unregister.
			f.prOutAPTPL(n, saRegisterIgnore, 0, 0, key, true)
			for k := uint64(1); k <= 5; k++ {
				f.prOutAPTPL(n, saRegisterIgnore, 0, 0, key<<8|k, true)
			}
			if key%2 == 1 {
				f.prOutAPTPL(n, saRegisterIgnore, 0, 0, 0, true)
			}
		}(nexuses[i], uint64(i+1))
	}
	wg.Wait()
	gen, keys := f.readKeys(nexusA)
	restart()
	g, _ := openPooledLU(t, dir)
	gen2, keys2 := g.readKeys(nexusA)
	if gen2 != gen || !slices.Equal(keys, keys2) || len(keys) != 4 {
		t.Fatalf("saved state differs from the last one in memory: generation %d keys %x, then %d %x", gen, keys, gen2, keys2)
	}
}
