package backend

import (
	"bytes"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// Reads give the same bytes whether they come from the page cache (the RWF_NOWAIT fast path),
// from the disk after the cache was dropped (the ordinary path finishes what the fast path
// left), from a hole, or from past the end of a file someone truncated (zeros).
func TestReadAtCachedUncachedHoleAndTruncated(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("r", 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	want := make([]byte, 3<<20)
	rand.New(rand.NewSource(1)).Read(want)
	if _, err := v.WriteAt(want, 1<<20); err != nil {
		t.Fatal(err)
	}
	check := func(what string) {
		t.Helper()
		got := make([]byte, 5<<20) // 1 MiB hole, 3 MiB data, 1 MiB hole
		if n, err := v.ReadAt(got, 0); err != nil || n != len(got) {
			t.Fatalf("%s: ReadAt = %d, %v", what, n, err)
		}
		if !bytes.Equal(got[1<<20:4<<20], want) {
			t.Fatalf("%s: data differs", what)
		}
		if !bytes.Equal(got[:1<<20], make([]byte, 1<<20)) || !bytes.Equal(got[4<<20:], make([]byte, 1<<20)) {
			t.Fatalf("%s: hole not zero", what)
		}
	}
	check("cached")
	fv := v.(*volRef).fileVol
	if noWaitReads && !fv.blockingReads.Load() {
		// Just written, so cached: the fast path alone reads it all.
		got := make([]byte, len(want))
		if done, eof, err := fv.readCached(got, 1<<20); err != nil || eof || done != len(got) || !bytes.Equal(got, want) {
			t.Fatalf("readCached of cached data = %d, %v, %v (equal %v)", done, eof, err, bytes.Equal(got, want))
		}
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	// Drop the cache of the second half of the data: a read that starts cached and ends
	// uncached (on file systems that keep no cache, such as tmpfs, all of it stays cached).
	if err := unix.Fadvise(fv.fd, 2<<20+512<<10, 4<<20, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	check("half cached")
	if err := unix.Fadvise(fv.fd, 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	check("uncached")

	// Someone else truncates the file below the volume's size: the missing end reads as zeros.
	if err := os.Truncate(filepath.Join(p.dir, "r"), 2<<20); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2<<20)
	if n, err := v.ReadAt(got, 1<<20); err != nil || n != len(got) {
		t.Fatalf("truncated: ReadAt = %d, %v", n, err)
	}
	if !bytes.Equal(got[:1<<20], want[:1<<20]) || !bytes.Equal(got[1<<20:], make([]byte, 1<<20)) {
		t.Fatal("truncated: want the data that is left, then zeros")
	}
}

// A page-cache hit allocates nothing.
func TestCachedReadAllocatesNothing(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("a", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	buf := make([]byte, 64<<10)
	if _, err := v.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { v.ReadAt(buf, 0) }); n != 0 {
		t.Fatalf("ReadAt allocates %v times per call", n)
	}
}
