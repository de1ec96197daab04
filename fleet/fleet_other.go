//go:build !linux

package fleet

// Add is not supported here.
func Add(dir, name string) (uint64, error) { return 0, ErrUnsupported }

// Delete is not supported here.
func Delete(dir, name string) error { return ErrUnsupported }

// In fails: network namespaces are Linux only.
func In(nsFd int, fn func() error) error { return ErrUnsupported }
