//go:build linux && rbd

package rbd

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"nstarget/backend"
)

// Image is a volume the SCSI layer can grow in place.
var _ backend.Grower = (*Image)(nil)

func TestOpenCreatesGrowsAndRefusesToShrink(t *testing.T) {
	c := connect(t, 10*time.Second)
	name := imageName(t, "")

	if err := c.Check(name, 8*mib); err != nil {
		t.Fatalf("Check of a missing image: %v", err)
	}
	img, err := c.Open(name, 8*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Name() != name || img.Size() != 8*mib {
		t.Fatalf("new image: name %q size %d, want %q %d", img.Name(), img.Size(), name, 8*mib)
	}
	// A second Open of the same name in the same Cluster shares the handle and may grow it.
	again, err := c.Open(name, 12*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Size() != 12*mib {
		t.Fatalf("after a larger second Open: size %d, want %d", img.Size(), 12*mib)
	}
	if _, err := c.Open(name, 8*mib, OpenOptions{}); !errors.Is(err, backend.ErrShrink) || !strings.Contains(err.Error(), name) {
		t.Fatalf("smaller Open of an open image: %v, want ErrShrink naming %s", err, name)
	}
	if err := img.Grow(4 * mib); !errors.Is(err, backend.ErrShrink) {
		t.Fatalf("Grow to a smaller size: %v, want ErrShrink", err)
	}
	if err := img.Grow(16 * mib); err != nil {
		t.Fatal(err)
	}
	if img.Size() != 16*mib || again.Size() != 16*mib {
		t.Fatalf("after Grow: sizes %d/%d, want %d", img.Size(), again.Size(), 16*mib)
	}
	// The last byte of the grown image is writable.
	if _, err := img.WriteAt([]byte{1}, 16*mib-1); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt([]byte{1}, 16*mib); err == nil {
		t.Fatal("write past the end succeeded")
	}
	for _, v := range []*Image{img, again} {
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatalf("second Close of the same reference: %v", err)
	}
	if _, err := img.ReadAt(make([]byte, 1), 0); !errors.Is(err, backend.ErrClosed) {
		t.Fatalf("read after close: %v, want ErrClosed", err)
	}

	// The size is the image's, not the handle's: a new client sees it.
	other := connect(t, 10*time.Second)
	if err := other.Check(name, 8*mib); !errors.Is(err, backend.ErrShrink) || !strings.Contains(err.Error(), name) {
		t.Fatalf("Check smaller than the image: %v, want ErrShrink naming %s", err, name)
	}
	if _, err := other.Open(name, 8*mib, OpenOptions{}); !errors.Is(err, backend.ErrShrink) || !strings.Contains(err.Error(), name) {
		t.Fatalf("Open smaller than the image: %v, want ErrShrink naming %s", err, name)
	}
	if err := other.Check(name, 16*mib); err != nil {
		t.Fatal(err)
	}
	img, err = other.Open(name, 24*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if img.Size() != 24*mib {
		t.Fatalf("reopened larger: size %d, want %d", img.Size(), 24*mib)
	}
	got := make([]byte, 1)
	if _, err := img.ReadAt(got, 16*mib-1); err != nil || got[0] != 1 {
		t.Fatalf("byte written before the grow: %v %v", got, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	for _, bad := range []string{"", ".hidden", "-x", "a/b", "a b"} {
		if _, err := other.Open(bad, mib, OpenOptions{}); !errors.Is(err, backend.ErrBadName) {
			t.Errorf("Open(%q): %v, want ErrBadName", bad, err)
		}
		if err := other.Check(bad, mib); !errors.Is(err, backend.ErrBadName) {
			t.Errorf("Check(%q): %v, want ErrBadName", bad, err)
		}
	}
	if _, err := other.Open(name, 0, OpenOptions{}); err == nil {
		t.Error("Open with size 0 succeeded")
	}
}

func TestWrittenDataReadsBackAcrossSizes(t *testing.T) {
	c := connect(t, 10*time.Second)
	name := imageName(t, "")
	img, err := c.Open(name, 16*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Objects are 4 MiB: several cases straddle an object boundary.
	cases := []struct{ off, n int64 }{
		{0, 512},
		{4096, 4096},
		{8192 + 512, 64<<10 + 512},
		{mib, mib},
		{4*mib - 4096, 8192},
		{5*mib + 3, 4*mib + 4096},
		{16*mib - 512, 512},
	}
	sums := make([][32]byte, len(cases))
	for i, tc := range cases {
		p := randomBytes(int(tc.n))
		sums[i] = sha256.Sum256(p)
		if n, err := img.WriteAt(p, tc.off); err != nil || n != len(p) {
			t.Fatalf("write %d bytes at %d: %d, %v", tc.n, tc.off, n, err)
		}
	}
	verify := func(v backend.Volume, who string) {
		t.Helper()
		for i, tc := range cases {
			p := make([]byte, tc.n)
			if n, err := v.ReadAt(p, tc.off); err != nil || n != len(p) {
				t.Fatalf("%s: read %d bytes at %d: %d, %v", who, tc.n, tc.off, n, err)
			}
			if sha256.Sum256(p) != sums[i] {
				t.Errorf("%s: %d bytes at %d differ from what was written", who, tc.n, tc.off)
			}
		}
	}
	verify(img, "same handle")
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	img, err = connect(t, 10*time.Second).Open(name, 16*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	verify(img, "another client")
}

func TestSyncSucceedsAfterWritesAndFailsAfterClose(t *testing.T) {
	c := connect(t, 10*time.Second)
	img, err := c.Open(imageName(t, ""), 4*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 8 {
		if _, err := img.WriteAt(randomBytes(4096), int64(i)*4096); err != nil {
			t.Fatal(err)
		}
	}
	if err := img.Sync(); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if err := img.Sync(); !errors.Is(err, backend.ErrClosed) {
		t.Fatalf("Sync after Close: %v, want ErrClosed", err)
	}
}

func TestUnmappedRangesReadZerosAndTheRestSurvives(t *testing.T) {
	c := connect(t, 10*time.Second)
	img, err := c.Open(imageName(t, ""), 12*mib, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	want := randomBytes(12 * mib)
	if _, err := img.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	// A whole object, a sub-granule unaligned range, and a range crossing an object boundary.
	for _, r := range []struct{ off, n int64 }{{0, 4 * mib}, {4*mib + 4096 + 512, 100000}, {8*mib - 3*4096, 5 * 4096}} {
		if err := img.Unmap(r.off, r.n); err != nil {
			t.Fatalf("Unmap [%d,+%d): %v", r.off, r.n, err)
		}
		clear(want[r.off : r.off+r.n])
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for got[i] == want[i] {
			i++
		}
		t.Fatalf("after Unmap the image differs first at byte %d: got %#x want %#x", i, got[i], want[i])
	}
	if mapped, n, err := img.Mapped(4096); err != nil || !mapped || n != 12*mib-4096 {
		t.Fatalf("Mapped(4096) = %v, %d, %v; want the rest reported mapped", mapped, n, err)
	}
	if err := img.Unmap(12*mib-4096, 8192); err == nil {
		t.Fatal("Unmap past the end succeeded")
	}
}

func TestConcurrentIOFrom16GoroutinesKeepsEveryWrite(t *testing.T) {
	c := connect(t, 10*time.Second)
	const workers, region, block = 16, 256 << 10, 4096
	img, err := c.Open(imageName(t, ""), workers*region, OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Go(func() {
			base := int64(w) * region
			written := make([]byte, region)
			for round := range 3 {
				for off := int64(0); off < region; off += block {
					p := randomBytes(block)
					if _, err := img.WriteAt(p, base+off); err != nil {
						errs <- err
						return
					}
					copy(written[off:], p)
					if off%(16*block) == 0 {
						got := make([]byte, block)
						if _, err := img.ReadAt(got, base+off); err != nil {
							errs <- err
							return
						}
						if !bytes.Equal(got, p) {
							errs <- fmt.Errorf("worker %d round %d: block at %d reads back different", w, round, base+off)
							return
						}
					}
				}
			}
			got := make([]byte, region)
			if _, err := img.ReadAt(got, base); err != nil {
				errs <- err
				return
			}
			if sha256.Sum256(got) != sha256.Sum256(written) {
				errs <- fmt.Errorf("worker %d: region differs from its last writes", w)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestErrnoMapsToWhatTheSCSILayerChecks(t *testing.T) {
	for _, tc := range []struct {
		ret  int64
		want []error
	}{
		{-int64(syscall.ENOSPC), []error{syscall.ENOSPC}},
		{-int64(syscall.EDQUOT), []error{syscall.EDQUOT}},
		{-int64(syscall.ETIMEDOUT), []error{syscall.ETIMEDOUT}},
		{-int64(syscall.ESHUTDOWN), []error{ErrFenced, syscall.ESHUTDOWN}}, // -EBLOCKLISTED
	} {
		err := (&image{c: &Cluster{}, name: "x"}).failed("write", 0, errno(tc.ret))
		for _, w := range tc.want {
			if !errors.Is(err, w) {
				t.Errorf("errno(%d) = %v, does not wrap %v", tc.ret, err, w)
			}
		}
	}
}
