package backend

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

func openTestPool(t *testing.T) *Pool {
	t.Helper()
	p, err := OpenPool(filepath.Join(t.TempDir(), "pool"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestOpenCreatesSparseFileOfConfiguredSize(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("vol1", 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	st, err := os.Stat(filepath.Join(p.dir, "vol1"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != 64<<20 || v.Size() != 64<<20 {
		t.Fatalf("size: file %d volume %d, want %d", st.Size(), v.Size(), 64<<20)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Blocks*512 > 64<<10 {
		t.Fatalf("new volume allocated %d bytes: not sparse", sys.Blocks*512)
	}
	mapped, length, err := v.Mapped(0)
	if err != nil {
		t.Fatal(err)
	}
	if mapped || length != 64<<20 {
		t.Fatalf("fresh volume: mapped=%v length=%d, want a hole of the whole volume", mapped, length)
	}
}

func TestReopenKeepsData(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("data", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("nstarget"), 512)
	if _, err := v.WriteAt(want, 4096); err != nil {
		t.Fatal(err)
	}
	if err := v.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := p.Open("data", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	got := make([]byte, len(want))
	if _, err := v2.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data not kept across reopen")
	}
}

func TestOpenRefusesToShrinkAndNamesVolume(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("big", 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	v.Close()
	_, err = p.Open("big", 1<<20)
	if !errors.Is(err, ErrShrink) {
		t.Fatalf("Open smaller: err %v, want ErrShrink", err)
	}
	if !bytes.Contains([]byte(err.Error()), []byte(`"big"`)) {
		t.Fatalf("error does not name the volume: %v", err)
	}
	st, _ := os.Stat(filepath.Join(p.dir, "big"))
	if st.Size() != 2<<20 {
		t.Fatalf("file size changed to %d", st.Size())
	}
	// Same while another user still has it open.
	v, err = p.Open("big", 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := p.Open("big", 1<<20); !errors.Is(err, ErrShrink) {
		t.Fatalf("Open smaller while open: err %v, want ErrShrink", err)
	}
}

func TestOpenGrowsSmallerFile(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("grow", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt([]byte("head"), 0); err != nil {
		t.Fatal(err)
	}
	v.Close()
	v, err = p.Open("grow", 3<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.Size() != 3<<20 {
		t.Fatalf("size %d, want %d", v.Size(), 3<<20)
	}
	b := make([]byte, 4)
	if _, err := v.ReadAt(b, 0); err != nil || string(b) != "head" {
		t.Fatalf("data lost on grow: %q %v", b, err)
	}
	if _, err := v.ReadAt(b, 3<<20-4); err != nil || !bytes.Equal(b, make([]byte, 4)) {
		t.Fatalf("grown tail not zero: %v %v", b, err)
	}
}

func TestCheckValidatesWithoutTouchingDisk(t *testing.T) {
	p := openTestPool(t)
	if err := p.Check("new-volume", 1<<20); err != nil {
		t.Fatalf("Check new: %v", err)
	}
	if _, err := os.Stat(filepath.Join(p.dir, "new-volume")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Check created the file: %v", err)
	}
	v, err := p.Open("existing", 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	v.Close()
	before, _ := os.Stat(filepath.Join(p.dir, "existing"))
	if err := p.Check("existing", 1<<20); !errors.Is(err, ErrShrink) {
		t.Fatalf("Check smaller: %v, want ErrShrink", err)
	}
	if err := p.Check("existing", 4<<20); err != nil {
		t.Fatalf("Check larger: %v", err)
	}
	after, _ := os.Stat(filepath.Join(p.dir, "existing"))
	if after.Size() != before.Size() || !after.ModTime().Equal(before.ModTime()) {
		t.Fatal("Check modified the file")
	}
}

func TestBadNamesAreRefused(t *testing.T) {
	p := openTestPool(t)
	for _, name := range []string{"", ".", "..", "../x", "a/b", ".hidden", "-opt", "sp ace", "nul\x00", string(make([]byte, 201))} {
		if err := p.Check(name, 4096); !errors.Is(err, ErrBadName) {
			t.Errorf("Check(%q): %v, want ErrBadName", name, err)
		}
		if _, err := p.Open(name, 4096); !errors.Is(err, ErrBadName) {
			t.Errorf("Open(%q): %v, want ErrBadName", name, err)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(p.dir))
	if len(entries) != 1 {
		t.Fatalf("something was created beside the pool: %v", entries)
	}
}

// A symlink planted in the pool must not lead a volume (and its grow-by-truncate) to a file
// outside it.
func TestSymlinkInPoolIsNotFollowed(t *testing.T) {
	p := openTestPool(t)
	outside := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(outside, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(p.dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := p.Check("link", 1<<20); err == nil {
		t.Error("Check accepted a symlink as a volume")
	}
	if v, err := p.Open("link", 1<<20); err == nil {
		v.Close()
		t.Error("Open followed a symlink out of the pool")
	}
	if st, err := os.Stat(outside); err != nil || st.Size() != 4 {
		t.Fatalf("the symlink's target was changed: %v %v", st, err)
	}
}

func TestSameNameSharesOneFile(t *testing.T) {
	p := openTestPool(t)
	a, err := p.Open("shared", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Open("shared", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if a.(*volRef).fileVol != b.(*volRef).fileVol {
		t.Fatal("two opens of one name use two files")
	}
	if _, err := a.WriteAt([]byte("x"), 10); err != nil {
		t.Fatal(err)
	}
	a.Close()
	a.Close() // double close of one reference must not drop the other's
	got := make([]byte, 1)
	if _, err := b.ReadAt(got, 10); err != nil || got[0] != 'x' {
		t.Fatalf("second reference broken after first closed: %q %v", got, err)
	}
	b.Close()
	if _, err := b.ReadAt(got, 10); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after last close: %v, want ErrClosed", err)
	}
}

func TestUnmapPunchesHoleThatReadsZeros(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("punch", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	data := bytes.Repeat([]byte{0xA5}, 64<<10)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if m, _, err := v.Mapped(8192); err != nil || !m {
		t.Fatalf("written range not mapped: %v %v", m, err)
	}
	if err := v.Unmap(8192, 16384); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 64<<10)
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range got {
		want := byte(0xA5)
		if i >= 8192 && i < 8192+16384 {
			want = 0
		}
		if c != want {
			t.Fatalf("byte %d = %#x, want %#x", i, c, want)
		}
	}
	m, l, err := v.Mapped(8192)
	if err != nil || m || l != 16384 {
		t.Fatalf("Mapped(8192) = %v,%d,%v; want hole of 16384", m, l, err)
	}
	m, l, err = v.Mapped(0)
	if err != nil || !m || l != 8192 {
		t.Fatalf("Mapped(0) = %v,%d,%v; want data of 8192", m, l, err)
	}
	// Unaligned unmap zeroes exactly the range.
	if err := v.Unmap(100, 10); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 12)
	v.ReadAt(b, 99)
	if b[0] != 0xA5 || b[11] != 0xA5 || !bytes.Equal(b[1:11], make([]byte, 10)) {
		t.Fatalf("unaligned unmap: %x", b)
	}
	if st, _ := os.Stat(filepath.Join(p.dir, "punch")); st.Size() != 1<<20 {
		t.Fatalf("unmap changed the file size to %d", st.Size())
	}
}

func TestIOOutsideVolumeIsRefused(t *testing.T) {
	p := openTestPool(t)
	v, err := p.Open("bounds", 8192)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	buf := make([]byte, 512)
	if _, err := v.WriteAt(buf, 8192-256); err == nil {
		t.Fatal("write across the end succeeded")
	}
	if _, err := v.ReadAt(buf, -1); err == nil {
		t.Fatal("read at negative offset succeeded")
	}
	if err := v.Unmap(4096, 8192); err == nil {
		t.Fatal("unmap across the end succeeded")
	}
	if st, _ := os.Stat(filepath.Join(p.dir, "bounds")); st.Size() != 8192 {
		t.Fatalf("file grew to %d", st.Size())
	}
}

func TestConcurrentUseOfOneVolume(t *testing.T) {
	p := openTestPool(t)
	const workers, blocks, bs = 8, 64, 4096
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := p.Open("conc", workers*blocks*bs)
			if err != nil {
				errs <- err
				return
			}
			defer v.Close()
			buf := bytes.Repeat([]byte{byte(w + 1)}, bs)
			got := make([]byte, bs)
			for i := 0; i < blocks; i++ {
				off := int64((w*blocks + i) * bs)
				if _, err := v.WriteAt(buf, off); err != nil {
					errs <- err
					return
				}
				if i%16 == 0 {
					if err := v.Sync(); err != nil {
						errs <- err
						return
					}
				}
				if _, err := v.ReadAt(got, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, buf) {
					errs <- errors.New("read back mismatch")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	p.mu.Lock()
	n := len(p.open)
	p.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d volumes still open after every user closed", n)
	}
}

// Two pools on one directory (two nstarget processes on one data_dir) must not both serve
// volumes; checking a configuration while one serves stays possible.
func TestSecondPoolOnSameDirectoryIsRefusedUntilFirstCloses(t *testing.T) {
	dir := t.TempDir()
	first, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := first.Open("vol", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	second, err := OpenPool(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer second.Close()
	if err := second.Check("vol", 1<<20); err != nil {
		t.Fatalf("Check while another pool serves: %v", err)
	}
	if _, err := second.Open("other", 1<<20); !errors.Is(err, ErrPoolBusy) {
		t.Fatalf("second pool Open: %v, want ErrPoolBusy", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "other")); !os.IsNotExist(err) {
		t.Fatalf("the refused Open created its volume (stat: %v)", err)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := second.Open("vol", 1<<20)
	if err != nil {
		t.Fatalf("Open after the first pool closed: %v", err)
	}
	v2.Close()
}

func TestPoolCloseClosesEverything(t *testing.T) {
	p, err := OpenPool(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	v, err := p.Open("a", 4096)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt([]byte("x"), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after pool close: %v", err)
	}
	if _, err := p.Open("a", 4096); err == nil {
		t.Fatal("open on a closed pool succeeded")
	}
}
