//go:build linux && rbd

package rbd

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"nstarget/backend"
)

func TestEveryClientPresentsAnImageWithTheSamePoolID(t *testing.T) {
	name := imageName(t, "")
	a, err := connect(t, 10*time.Second).Open(name, mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	idA := a.PoolID()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := connect(t, 10*time.Second).Open(name, mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if idA == (backend.PoolID{}) || b.PoolID() != idA {
		t.Fatalf("pool ids %s and %s, want one non-zero id on every client", idA, b.PoolID())
	}
	if _, err := backend.ParsePoolID(idA.String()); err != nil {
		t.Fatal(err)
	}
	if poolID("other-fsid", 1) == poolID("other-fsid", 2) || poolID("a", 1) == poolID("b", 1) {
		t.Fatal("poolID ignores the fsid or the pool")
	}
}

func TestStateMovesWithTheImageToTheNextOwner(t *testing.T) {
	name := imageName(t, "")
	a, err := connect(t, 10*time.Second).Open(name, mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := a.LoadState("pr"); got != nil || err != nil {
		t.Fatalf("state of a new image: %q, %v; want nil, nil", got, err)
	}
	want := append([]byte(`{"key":1}`), 0, 0xFF, '\n') // opaque: NULs and non-UTF-8 too
	if err := a.SaveState("pr", want); err != nil {
		t.Fatal(err)
	}
	if err := a.SaveState("Bad.Key", want); err == nil {
		t.Fatal("SaveState accepted an invalid key")
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	b, err := connect(t, 10*time.Second).Open(name, mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if got, err := b.LoadState("pr"); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("state on the next owner: %q, %v; want %q", got, err, want)
	}
	if err := b.SaveState("pr", nil); err != nil {
		t.Fatal(err)
	}
	if got, err := b.LoadState("pr"); got != nil || err != nil {
		t.Fatalf("removed state: %q, %v; want nil, nil", got, err)
	}
	if err := b.SaveState("pr", nil); err != nil {
		t.Fatalf("removing absent state: %v", err)
	}
}

func TestAFencedClientCannotOverwriteItsSuccessorsState(t *testing.T) {
	name := imageName(t, "")
	a, err := connect(t, 10*time.Second).Open(name, mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := connect(t, 10*time.Second).Open(name, mib, OpenOptions{Fence: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.SaveState("pr", []byte("new")); err != nil {
		t.Fatal(err)
	}
	if err := a.SaveState("pr", []byte("old")); !errors.Is(err, ErrFenced) {
		t.Fatalf("fenced client's SaveState: %v, want ErrFenced", err)
	}
	if got, err := b.LoadState("pr"); err != nil || string(got) != "new" {
		t.Fatalf("successor's state: %q, %v", got, err)
	}
}
