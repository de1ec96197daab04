//go:build linux && rbd

package rbd

import (
	"bytes"
	"errors"
	"slices"
	"syscall"
	"testing"
	"time"
)

// A hot standby (Prepare) must change nothing about fencing: the take-over from a hung holder
// still blocklists it before any write of the new owner, the holder, resumed, is refused, and
// the new owner's data stays. It only saves the open.
func TestStandbyTakesOverFromAHungHolderAndTheHolderNeverWritesAgain(t *testing.T) {
	name := imageName(t, "")
	h := startHolder(t, name)

	b := connect(t, 10*time.Second)
	if err := b.Prepare(name); err != nil {
		t.Fatalf("Prepare while another client holds the lock: %v", err)
	}
	if got := b.Standby(); !slices.Equal(got, []string{name}) {
		t.Fatalf("standby handles after Prepare: %v, want [%s]", got, name)
	}
	// Without Fence the standby is refused like any other client: it did not take the lock.
	if _, err := b.Open(name, 4*mib, OpenOptions{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("Open of a standby image held by another client, without Fence: %v, want ErrLocked", err)
	}
	if err := b.Prepare(name); err != nil { // the failed Open closed the handle: stand by again
		t.Fatal(err)
	}

	if err := h.proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	before := blocklist(t)
	start := time.Now()
	img, err := b.Open(name, 4*mib, OpenOptions{Fence: true})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("Open with Fence from the standby while the holder hangs: %v", err)
	}
	defer img.Close()
	t.Logf("take-over from the standby handle took %v", took)
	if took > hungHolderBound {
		t.Errorf("take-over took %v: it waited for the hung holder instead of breaking its lock first", took)
	}
	if got := b.Standby(); len(got) != 0 {
		t.Errorf("standby handles while the image is open: %v, want none (Open took it)", got)
	}
	if after := blocklist(t); len(after) <= len(before) {
		t.Errorf("blocklist after the take-over: %v, was %v: the holder was not fenced", after, before)
	}
	h.wakeAndExpectFenced(img)
}

// The last Close of an image its client stands by for releases the lock (a planned hand-over:
// the next owner needs no fence, nobody is blocklisted) and keeps the handle as standby;
// Unprepare drops it.
func TestStandbyHandleIsParkedOnCloseAndHandsOverWithoutBlocklisting(t *testing.T) {
	nodeA := connect(t, 10*time.Second)
	nodeB := connect(t, 10*time.Second)
	name := imageName(t, "")
	before := blocklist(t)
	if err := nodeB.Prepare(name); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("Prepare of a missing image: %v, want ENOENT (a standby never creates)", err)
	}
	a, err := nodeA.Open(name, 4*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := nodeA.Prepare(name); err != nil { // A stands by for what it serves: parked on Close
		t.Fatal(err)
	}
	if err := nodeB.Prepare(name); err != nil {
		t.Fatal(err)
	}
	data := randomBytes(64 << 10)
	if _, err := a.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if got := nodeA.Standby(); !slices.Equal(got, []string{name}) {
		t.Fatalf("A's standby handles after its Close: %v, want [%s]", got, name)
	}
	b, err := nodeB.Open(name, 4*mib, OpenOptions{}) // no Fence: a released lock needs none
	if err != nil {
		t.Fatalf("Open from the standby after a planned Close: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := b.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data of the previous owner: equal=%v, %v", bytes.Equal(got, data), err)
	}
	// A's parked handle holds no lock: B writes, and A cannot open it without a fence.
	if _, err := b.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := nodeA.Open(name, 4*mib, OpenOptions{}); !errors.Is(err, ErrLocked) {
		t.Fatalf("A opening the image B holds: %v, want ErrLocked", err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	nodeA.Unprepare(name)
	nodeB.Unprepare(name)
	if a, b := nodeA.Standby(), nodeB.Standby(); len(a)+len(b) != 0 {
		t.Fatalf("standby handles after Unprepare: %v %v", a, b)
	}
	if after := blocklist(t); !slices.Equal(before, after) {
		t.Fatalf("blocklist changed by planned hand-overs: %v -> %v", before, after)
	}
}
