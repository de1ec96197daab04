package backend

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPoolIDIsCreatedByFirstOpenAndKeptAcrossReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	p, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := p.ID(); ok {
		t.Fatal("a fresh pool has an identity before any volume is opened")
	}
	v, err := p.Open("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	id, ok := p.ID()
	if !ok || id == (PoolID{}) {
		t.Fatal("no identity after the first Open")
	}
	if got := v.(Identified).PoolID(); got != id {
		t.Fatalf("volume reports pool id %s, pool says %s", got, id)
	}
	if id[6]>>4 != 4 || id[8]&0xC0 != 0x80 {
		t.Fatalf("pool id %s is not a version 4 UUID", id)
	}
	p.Close()

	p2, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if id2, ok := p2.ID(); !ok || id2 != id {
		t.Fatalf("reopened pool id %s (ok=%v), want %s", id2, ok, id)
	}
	if _, err := p2.Open("other", 1<<20); err != nil {
		t.Fatal(err)
	}
	if id2, _ := p2.ID(); id2 != id {
		t.Fatalf("opening a volume changed the pool id from %s to %s", id, id2)
	}
}

func TestTwoPoolsGetDifferentIDs(t *testing.T) {
	a, b := openTestPool(t), openTestPool(t)
	for _, p := range []*Pool{a, b} {
		if _, err := p.Open("same-name", 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	ida, _ := a.ID()
	idb, _ := b.ID()
	if ida == idb {
		t.Fatalf("two pools share id %s", ida)
	}
}

func TestCheckCreatesNoPoolID(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	p, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if err := p.Check("vol", 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, poolIDFile)); !os.IsNotExist(err) {
		t.Fatalf("Check created the pool id file (stat err %v)", err)
	}
}

func TestDamagedPoolIDIsRefusedNotReplaced(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, poolIDFile)
	if err := os.WriteFile(path, []byte("not-a-uuid\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := OpenPool(dir)
	if err == nil || !strings.Contains(err.Error(), poolIDFile) {
		t.Fatalf("OpenPool with a damaged id: err %v, want one naming %s", err, poolIDFile)
	}
	if b, _ := os.ReadFile(path); string(b) != "not-a-uuid\n" {
		t.Fatalf("damaged id file was rewritten to %q", b)
	}
}

func TestPoolIDRoundTripsThroughItsTextForm(t *testing.T) {
	id, err := newPoolID()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParsePoolID(" " + id.String() + "\n")
	if err != nil || got != id {
		t.Fatalf("parse(%s) = %s, %v", id, got, err)
	}
	for _, bad := range []string{"", "00000000-0000-0000-0000-000000000000", "0123456789abcdef0123456789abcdef", "zzzzzzzz-0000-4000-8000-000000000000"} {
		if _, err := ParsePoolID(bad); err == nil {
			t.Errorf("ParsePoolID(%q) accepted", bad)
		}
	}
}
