package backend

import (
	"os"
	"path/filepath"
	"testing"
)

func TestStateIsSavedBesideTheVolumeAndSurvivesReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pool")
	p, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := p.Open("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	s := v.(StateStore)
	if b, err := s.LoadState("pr"); err != nil || b != nil {
		t.Fatalf("fresh volume state %q, %v; want none", b, err)
	}
	for _, content := range []string{"first", "second"} {
		if err := s.SaveState("pr", []byte(content)); err != nil {
			t.Fatal(err)
		}
	}
	p.Close()

	p2, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	v2, err := p2.Open("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := v2.(StateStore).LoadState("pr"); err != nil || string(b) != "second" {
		t.Fatalf("state after reopen %q, %v; want %q", b, err, "second")
	}
	// Only the state file is left in the state directory: no temporary files.
	ents, err := os.ReadDir(filepath.Join(dir, stateDir))
	if err != nil || len(ents) != 1 || ents[0].Name() != "vol.pr" {
		t.Fatalf("state directory holds %v (err %v), want only vol.pr", ents, err)
	}
}

func TestSavingNilRemovesTheState(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	s := v.(StateStore)
	if err := s.SaveState("pr", nil); err != nil {
		t.Fatalf("removing state that never existed: %v", err)
	}
	if err := s.SaveState("pr", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveState("pr", nil); err != nil {
		t.Fatal(err)
	}
	if b, err := s.LoadState("pr"); err != nil || b != nil {
		t.Fatalf("state after removal %q, %v; want none", b, err)
	}
}

func TestStateKeysCannotEscapeOrCollide(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"", "../x", "a.b", "PR", "/etc"} {
		if err := v.(StateStore).SaveState(key, []byte("x")); err == nil {
			t.Errorf("SaveState accepted key %q", key)
		}
	}
}
