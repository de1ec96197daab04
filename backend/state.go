package backend

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// stateDir holds small per-volume state files beside the volumes. Its dot name can never be a
// volume (ValidName), so it cannot collide with one.
const stateDir = ".state"

// StateStore keeps small, rarely changing state that belongs to a volume but is not its data
// (the SCSI layer keeps persistent reservations here). The backend owns the file I/O and knows
// nothing of the content. Like Identified, it is separate from Volume so that a backend
// without it still satisfies Volume; its users then go without persistence.
type StateStore interface {
	// LoadState returns what SaveState last stored under key, or nil if nothing is.
	LoadState(key string) ([]byte, error)
	// SaveState replaces the state under key atomically and durably: after it returns, a
	// crash or power loss leaves exactly data. A nil data removes the state, also durably.
	SaveState(key string, data []byte) error
}

// validStateKey keeps keys to [a-z] so that "<volume>.<key>" names one (volume, key) pair
// only: the volume is what precedes the last dot.
func validStateKey(key string) error {
	if key == "" || len(key) > 16 {
		return fmt.Errorf("state key %q: length must be 1..16", key)
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 'a' || key[i] > 'z' {
			return fmt.Errorf("state key %q: only [a-z] allowed", key)
		}
	}
	return nil
}

func (v *fileVol) stateName(key string) (dir, name string, err error) {
	if err := validStateKey(key); err != nil {
		return "", "", fmt.Errorf("backend: volume %q: %w", v.name, err)
	}
	return filepath.Join(v.pool.dir, stateDir), v.name + "." + key, nil
}

// LoadState implements StateStore.
func (v *fileVol) LoadState(key string) ([]byte, error) {
	dir, name, err := v.stateName(key)
	if err != nil {
		return nil, err
	}
	v.stateMu.Lock()
	defer v.stateMu.Unlock()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("backend: volume %q: load %s state: %w", v.name, key, err)
	}
	return b, nil
}

// SaveState implements StateStore.
func (v *fileVol) SaveState(key string, data []byte) error {
	dir, name, err := v.stateName(key)
	if err != nil {
		return err
	}
	v.stateMu.Lock()
	defer v.stateMu.Unlock()
	if data == nil {
		if err := removeFileDurably(dir, name); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("backend: volume %q: remove %s state: %w", v.name, key, err)
		}
		return nil
	}
	if err := v.ensureStateDir(dir); err != nil {
		return err
	}
	if err := writeFileAtomic(dir, name, data); err != nil {
		return fmt.Errorf("backend: volume %q: save %s state: %w", v.name, key, err)
	}
	return nil
}

// ensureStateDir creates the state directory on first use and makes its entry in the pool
// durable, or a state file saved in it could vanish with the directory after a crash.
func (v *fileVol) ensureStateDir(dir string) error {
	err := os.Mkdir(dir, 0o750)
	if errors.Is(err, os.ErrExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("backend: volume %q: create %s: %w", v.name, dir, err)
	}
	if err := syncDir(v.pool.dir); err != nil {
		return fmt.Errorf("backend: volume %q: %w", v.name, err)
	}
	return nil
}
