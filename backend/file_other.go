//go:build !linux

package backend

import (
	"fmt"
	"os"
	"runtime"
)

// errUnsupported is what the pool says on other systems: volumes rely on fdatasync, hole
// punching and SEEK_DATA as Linux has them. Refusing at the first Open (before any volume file
// exists) keeps ValidName and Check usable, so a configuration can be checked anywhere.
var errUnsupported = fmt.Errorf("backend: the volume pool is not supported on %s", runtime.GOOS)

func lockDir(dir string) (*os.File, error) { return nil, errUnsupported }

func openVolumeFile(dir, name string) (*os.File, bool, error) { return nil, false, errUnsupported }

func syncDir(dir string) error { return errUnsupported }

// No fileVol exists here (Open fails before one is made); these only complete the type.

func (v *fileVol) closeFile() error                         { return errUnsupported }
func (v *fileVol) ReadAt(p []byte, off int64) (int, error)  { return 0, errUnsupported }
func (v *fileVol) WriteAt(p []byte, off int64) (int, error) { return 0, errUnsupported }
func (v *fileVol) Sync() error                              { return errUnsupported }
func (v *fileVol) Unmap(off, length int64) error            { return errUnsupported }
func (v *fileVol) Mapped(off int64) (bool, int64, error)    { return false, 0, errUnsupported }

func statPool(dir string) (Space, error) { return Space{}, errUnsupported }
func allocated(fd int) (int64, error)    { return 0, errUnsupported }
