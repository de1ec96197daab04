package target

import (
	"bytes"
	"errors"
	"fmt"
)

// textKV is one text key=value pair (RFC 7143 §6.1).
type textKV struct{ Key, Value string }

const (
	maxKeyLen   = 63
	maxValueLen = 8192 // allows long binary/CHAP values; ours are far shorter
)

// parseTextKeys splits a text data segment into key=value pairs in order. A trailing
// fragment without NUL is an error unless partial is true (C bit set), in which case it is
// returned as rest for the next PDU to complete.
func parseTextKeys(data []byte, partial bool) (kvs []textKV, rest []byte, err error) {
	for len(data) > 0 {
		i := bytes.IndexByte(data, 0)
		if i < 0 {
			if partial {
				return kvs, data, nil
			}
			return nil, nil, errors.New("text key without NUL terminator")
		}
		pair := data[:i]
		data = data[i+1:]
		if len(pair) == 0 {
			// Padding NULs between/after pairs are tolerated (some initiators send them).
			continue
		}
		eq := bytes.IndexByte(pair, '=')
		if eq <= 0 {
			return nil, nil, fmt.Errorf("malformed text pair %q", truncate(pair))
		}
		if eq > maxKeyLen {
			return nil, nil, fmt.Errorf("text key too long (%d bytes)", eq)
		}
		if len(pair)-eq-1 > maxValueLen {
			return nil, nil, fmt.Errorf("text value of %q too long", pair[:eq])
		}
		kvs = append(kvs, textKV{string(pair[:eq]), string(pair[eq+1:])})
	}
	return kvs, nil, nil
}

func truncate(b []byte) []byte {
	if len(b) > 32 {
		return b[:32]
	}
	return b
}

// appendTextKeys encodes pairs as key=value\0.
func appendTextKeys(dst []byte, kvs []textKV) []byte {
	for _, kv := range kvs {
		dst = append(dst, kv.Key...)
		dst = append(dst, '=')
		dst = append(dst, kv.Value...)
		dst = append(dst, 0)
	}
	return dst
}
