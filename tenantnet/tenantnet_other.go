//go:build !linux

package tenantnet

// netSys is empty where tenant networks are not supported.
type netSys struct{}

func up(dir, name string, spec Spec) (*Net, error) { return nil, ErrUnsupported }

func (n *Net) downLocked() error { return ErrUnsupported }

func (n *Net) announceLocked() error { return ErrUnsupported }
