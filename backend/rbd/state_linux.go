//go:build linux && rbd

package rbd

import (
	"encoding/base64"
	"fmt"

	"nstarget/backend"
)

var (
	_ backend.Identified = (*Image)(nil)
	_ backend.StateStore = (*Image)(nil)
)

// PoolID is the same for an image on every node (see poolID), so a host that reaches it
// through several nodes, or through a new node after a fail-over, sees one disk.
func (i *Image) PoolID() backend.PoolID { return i.img.c.id }

// stateKeyPrefix keeps our keys apart from librbd's own image metadata ("conf_*" overrides).
const stateKeyPrefix = "nstarget.state."

func validStateKey(name, key string) error {
	if key == "" || len(key) > 16 {
		return fmt.Errorf("rbd: image %s: state key %q: length must be 1..16", name, key)
	}
	for i := 0; i < len(key); i++ {
		if key[i] < 'a' || key[i] > 'z' {
			return fmt.Errorf("rbd: image %s: state key %q: only [a-z] allowed", name, key)
		}
	}
	return nil
}

// LoadState returns what SaveState last stored under key, or nil. The state lives in the
// image's own metadata, so it moves with the image to whichever node opens it next.
func (i *Image) LoadState(key string) ([]byte, error) {
	v := i.img
	if err := validStateKey(v.name, key); err != nil {
		return nil, err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return nil, err
	}
	v.stateMu.Lock()
	s, ok := v.stateAt[stateKeyPrefix+key]
	read := v.stateOK && !v.stateUsed[key]
	if read {
		v.stateUsed[key] = true
	}
	v.stateMu.Unlock()
	if !read {
		var err error
		if s, ok, err = rbdMetaGet(v.h, stateKeyPrefix+key); err != nil {
			return nil, v.fail("load state "+key, err)
		}
	}
	if !ok {
		return nil, nil
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("rbd: image %s: state %s is damaged: %w", v.name, key, err)
	}
	return b, nil
}

// SaveState replaces the state under key (nil removes it). One metadata update is one
// omap write on the image header, atomic and durable once acknowledged; it needs the
// exclusive lock, so a fenced node can never overwrite its successor's state. Values are
// base64 because librbd metadata values are C strings.
func (i *Image) SaveState(key string, data []byte) error {
	v := i.img
	if err := validStateKey(v.name, key); err != nil {
		return err
	}
	v.mu.RLock()
	defer v.mu.RUnlock()
	if err := v.usable(); err != nil {
		return err
	}
	v.stateMu.Lock()
	v.stateOK = false // what was read at open is stale from now on
	v.stateMu.Unlock()
	var err error
	if data == nil {
		err = rbdMetaRemove(v.h, stateKeyPrefix+key)
	} else {
		err = rbdMetaSet(v.h, stateKeyPrefix+key, base64.StdEncoding.EncodeToString(data))
	}
	if err != nil {
		return v.fail("save state "+key, err)
	}
	return nil
}
