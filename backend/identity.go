package backend

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// poolIDFile holds the pool's identity. A dot name can never be a volume (ValidName refuses a
// leading '.'), so it cannot collide with one.
const poolIDFile = ".pool-id"

// PoolID is a pool's random identity (an RFC 9562 version 4 UUID), created once with the pool
// and never changed: device identifiers (WWNs, serial numbers) derive from it plus the volume
// name, so two appliances with the same volume names still present different disks.
type PoolID [16]byte

// String is the canonical 8-4-4-4-12 form.
func (id PoolID) String() string {
	h := hex.EncodeToString(id[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

// ParsePoolID reads the canonical form (surrounding white space allowed).
func ParsePoolID(s string) (PoolID, error) {
	var id PoolID
	b := bytes.TrimSpace([]byte(s))
	if len(b) != 36 || b[8] != '-' || b[13] != '-' || b[18] != '-' || b[23] != '-' {
		return id, fmt.Errorf("pool id %q: not a UUID", s)
	}
	h := make([]byte, 0, 32)
	for i, c := range b {
		if i != 8 && i != 13 && i != 18 && i != 23 {
			h = append(h, c)
		}
	}
	if _, err := hex.Decode(id[:], h); err != nil {
		return id, fmt.Errorf("pool id %q: %w", s, err)
	}
	if id == (PoolID{}) {
		return id, fmt.Errorf("pool id %q: all zero", s)
	}
	return id, nil
}

func newPoolID() (PoolID, error) {
	var id PoolID
	if _, err := rand.Read(id[:]); err != nil {
		return id, fmt.Errorf("random pool id: %w", err)
	}
	id[6] = id[6]&0x0F | 0x40 // version 4
	id[8] = id[8]&0x3F | 0x80 // RFC 9562 variant
	return id, nil
}

// readPoolID loads dir's identity; ok is false if the pool has none yet. A damaged file is an
// error, never silently replaced: a new identity would change every disk's WWN under its hosts.
func readPoolID(dir string) (id PoolID, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dir, poolIDFile))
	if errors.Is(err, os.ErrNotExist) {
		return id, false, nil
	}
	if err != nil {
		return id, false, fmt.Errorf("read pool id: %w", err)
	}
	id, err = ParsePoolID(string(b))
	if err != nil {
		return id, false, fmt.Errorf("%s: %w", filepath.Join(dir, poolIDFile), err)
	}
	return id, true, nil
}

// ensureIDLocked gives the pool its identity, creating it on first use; p.mu and the pool's
// flock must be held, so two processes can never create two identities for one directory.
func (p *Pool) ensureIDLocked() error {
	if p.hasID {
		return nil
	}
	// Read again under the flock: another process may have created it since OpenPool.
	id, ok, err := readPoolID(p.dir)
	if err != nil {
		return err
	}
	if !ok {
		if id, err = newPoolID(); err != nil {
			return err
		}
		if err := writeFileAtomic(p.dir, poolIDFile, []byte(id.String()+"\n")); err != nil {
			return fmt.Errorf("create pool id: %w", err)
		}
	}
	p.id, p.hasID = id, true
	return nil
}

// ID reports the pool's identity; ok is false while a new pool has not opened a volume yet
// (the identity is created with the first volume, so `check` creates nothing).
func (p *Pool) ID() (id PoolID, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.id, p.hasID
}

// Identified is implemented by volumes that belong to a pool with an identity (every volume of
// a Pool). It is separate from Volume so that a backend without one still satisfies Volume.
type Identified interface {
	PoolID() PoolID
}

// PoolID is the identity of the pool v lives in; it is set before v exists and never changes.
func (v *fileVol) PoolID() PoolID { return v.pool.id }
