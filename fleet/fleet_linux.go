package fleet

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

// Add creates the network namespace dir/name with its loopback up, as `ip netns add` does (a
// mode-000 placeholder, a new namespace, bind-mounted onto it), and returns its id
// (NS_GET_ID). dir is created if missing. An existing name is an error.
func Add(dir, name string) (uint64, error) {
	if err := validName(name); err != nil {
		return 0, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, fmt.Errorf("fleet: %w", err)
	}
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0)
	if err != nil {
		return 0, fmt.Errorf("fleet: namespace %s: %w", name, err)
	}
	f.Close()
	var id uint64
	err = onNewNamespace(func() error {
		if err := loUp(); err != nil {
			return fmt.Errorf("lo up: %w", err)
		}
		fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		id, err = unix.IoctlGetUint64(fd, unix.NS_GET_ID)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("NS_GET_ID: %w", err)
		}
		return unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, "")
	})
	if err != nil {
		os.Remove(path)
		return 0, fmt.Errorf("fleet: namespace %s: %w", name, err)
	}
	return id, nil
}

// Delete removes the namespace dir/name as `ip netns del` does: the mount is detached (the
// namespace dies with its last user) and the file removed. A missing name is not an error; a
// file there that is not a namespace mount is left alone and reported.
func Delete(dir, name string) error {
	if err := validName(name); err != nil {
		return err
	}
	path := filepath.Join(dir, name)
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("fleet: namespace %s: %w", name, err)
	}
	if st.Type != unix.NSFS_MAGIC {
		// A placeholder whose mount never happened is empty: remove only that.
		if fi, err := os.Stat(path); err == nil && fi.Mode().IsRegular() && fi.Size() == 0 && fi.Mode().Perm() == 0 {
			return os.Remove(path)
		}
		return fmt.Errorf("fleet: %s is not a namespace mount; left alone", path)
	}
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("fleet: namespace %s: unmount: %w", name, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("fleet: namespace %s: %w", name, err)
	}
	return nil
}

func validName(name string) error {
	if name == "" || name == "." || name == ".." || filepath.Base(name) != name {
		return fmt.Errorf("fleet: bad namespace name %q", name)
	}
	return nil
}

// onNewNamespace runs fn on a locked thread inside a new network namespace (see onThread).
func onNewNamespace(fn func() error) error {
	return onThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("unshare: %w", err)
		}
		return nil
	}, fn)
}

// In runs fn on a fresh goroutine's OS thread, locked, inside the network namespace nsFd (an
// fd on a namespace file), then returns the thread to the namespace it came from and unlocks
// it. A socket keeps the namespace it was created in, so fn should only create sockets (or
// configure the namespace); it must not start goroutines that expect to be in it, nor call
// setns or unshare.
func In(nsFd int, fn func() error) error {
	return onThread(func() error {
		if err := unix.Setns(nsFd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns: %w", err)
		}
		return nil
	}, fn)
}

// onThread runs enter then fn on a fresh goroutine's locked OS thread, then brings the thread
// home. If it cannot go home, the goroutine ends locked and the runtime destroys the thread
// rather than reuse it in a tenant namespace; a fresh goroutine (rather than the caller's) is
// what makes that last resort possible, and leaves the caller's own thread untouched.
func onThread(enter, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		home, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer unix.Close(home)
		if err := enter(); err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		ferr := fn()
		if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return to the home namespace: %w", err))
			return // exits locked: the thread dies
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// loUp brings the calling thread's namespace's loopback up.
func loUp() error {
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr)
}
