// Package chap holds the pure parts of iSCSI CHAP (RFC 7143 §12.1.3, RFC 1994): the algorithms
// of the IANA CHAP registry that iSCSI uses, the response function, the binary-value encoding
// of CHAP_C and CHAP_R, and the Secret type that keeps secrets out of logs, errors and panics.
// It is shared by target (the login) and conf (validation), like iscsiname.
//
// It must never: print, log or return a secret in any form other than through Response.
package chap

import (
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha3"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"log/slog"
	"strings"
)

// MinSecretLen is the shortest secret accepted: RFC 7143 §12.1.3 advises at least 96 bits, and
// a short secret can be recovered offline from one observed exchange.
const MinSecretLen = 12

// MaxSecretLen bounds a secret; nothing a real initiator stores is longer.
const MaxSecretLen = 256

const redacted = "[redacted]"

// Secret is a CHAP secret. It prints as [redacted] under every fmt verb and in slog. Its
// bytes live in a closure: fmt reaches unexported fields by reflection, without methods, and
// prints a pointer's target or a byte slice in full, but a func only as its address, so even
// a struct holding a Secret in an unexported field prints no secret.
type Secret struct{ get func() []byte }

// NewSecret copies b into a Secret.
func NewSecret(b []byte) Secret {
	c := append([]byte(nil), b...)
	return Secret{get: func() []byte { return c }}
}

func (s Secret) bytes() []byte {
	if s.get == nil {
		return nil
	}
	return s.get()
}

// Len is the secret's length in bytes (for validation messages).
func (s Secret) Len() int { return len(s.bytes()) }

// IsZero reports whether no secret is set.
func (s Secret) IsZero() bool { return s.Len() == 0 }

// Equal compares two secrets in constant time (for "the same secret in both directions").
func (s Secret) Equal(o Secret) bool {
	return s.Len() == o.Len() && s.Len() > 0 && subtle.ConstantTimeCompare(s.bytes(), o.bytes()) == 1
}

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) Format(f fmt.State, _ rune)   { _, _ = f.Write([]byte(redacted)) }
func (Secret) LogValue() slog.Value         { return slog.StringValue(redacted) }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }

// Algorithm is a CHAP algorithm number from the IANA PPP authentication algorithms registry.
type Algorithm uint8

// The algorithms iSCSI uses (RFC 7143 §12.1.3 and the IANA registry).
const (
	MD5      Algorithm = 5
	SHA1     Algorithm = 6
	SHA256   Algorithm = 7
	SHA3_256 Algorithm = 8
)

// DefaultAlgorithms is the default preference: strongest first. MD5 stays last because it is
// the only one many initiators (libiscsi, older open-iscsi, Windows) speak.
var DefaultAlgorithms = []Algorithm{SHA3_256, SHA256, SHA1, MD5}

var names = map[Algorithm]string{MD5: "MD5", SHA1: "SHA-1", SHA256: "SHA-256", SHA3_256: "SHA3-256"}

func (a Algorithm) String() string {
	if n, ok := names[a]; ok {
		return n
	}
	return fmt.Sprintf("CHAP-algorithm-%d", uint8(a))
}

// Known reports whether a is one of the four algorithms implemented here.
func (a Algorithm) Known() bool { _, ok := names[a]; return ok }

// ParseAlgorithm reads a configured algorithm name: MD5, SHA-1, SHA-256, SHA3-256
// (case-insensitive; the dash is optional).
func ParseAlgorithm(s string) (Algorithm, error) {
	norm := strings.ReplaceAll(strings.ToUpper(strings.TrimSpace(s)), "-", "")
	for a, n := range names {
		if strings.ReplaceAll(n, "-", "") == norm {
			return a, nil
		}
	}
	return 0, fmt.Errorf("unknown CHAP algorithm %q (want MD5, SHA-1, SHA-256 or SHA3-256)", s)
}

func (a Algorithm) hash() hash.Hash {
	switch a {
	case MD5:
		return md5.New()
	case SHA1:
		return sha1.New()
	case SHA256:
		return sha256.New()
	case SHA3_256:
		return sha3.New256()
	}
	panic("chap: unknown algorithm " + a.String())
}

// Size is the length of a response in bytes.
func (a Algorithm) Size() int {
	switch a {
	case MD5:
		return md5.Size
	case SHA1:
		return sha1.Size
	}
	return 32
}

// ChallengeLen is how long a challenge we issue with a is: the digest size, at least 16 bytes
// (what LIO and open-iscsi issue for MD5; libiscsi accepts that).
func (a Algorithm) ChallengeLen() int { return max(16, a.Size()) }

// Response computes H(id || secret || challenge) (RFC 1994 §4.1).
func (a Algorithm) Response(id byte, s Secret, challenge []byte) []byte {
	h := a.hash()
	h.Write([]byte{id})
	h.Write(s.bytes())
	h.Write(challenge)
	return h.Sum(nil)
}

// Verify reports in constant time whether resp is the right response.
func (a Algorithm) Verify(id byte, s Secret, challenge, resp []byte) bool {
	want := a.Response(id, s, challenge)
	// ConstantTimeCompare returns at once on a length mismatch; the length is no secret.
	return subtle.ConstantTimeCompare(want, resp) == 1
}

// MaxBinaryLen bounds a decoded CHAP_C or CHAP_R (RFC 7143 §12.1.3: "1024 bytes").
const MaxBinaryLen = 1024

// DecodeBinary reads an RFC 7143 §6.1 binary-value: 0x/0X hex (an odd count of digits is
// allowed, with an implied leading zero) or 0b/0B base64.
func DecodeBinary(v string) ([]byte, error) {
	if len(v) < 3 || v[0] != '0' {
		return nil, errors.New("not a binary value (want 0x… hex or 0b… base64)")
	}
	body := v[2:]
	var out []byte
	var err error
	switch v[1] {
	case 'x', 'X':
		if len(body)%2 == 1 {
			body = "0" + body
		}
		if len(body)/2 > MaxBinaryLen {
			return nil, fmt.Errorf("binary value longer than %d bytes", MaxBinaryLen)
		}
		out, err = hex.DecodeString(body)
	case 'b', 'B':
		if base64.StdEncoding.DecodedLen(len(body)) > MaxBinaryLen+2 {
			return nil, fmt.Errorf("binary value longer than %d bytes", MaxBinaryLen)
		}
		out, err = base64.StdEncoding.DecodeString(body)
		if err != nil {
			// Some initiators drop the padding.
			out, err = base64.RawStdEncoding.DecodeString(body)
		}
	default:
		return nil, errors.New("not a binary value (want 0x… hex or 0b… base64)")
	}
	if err != nil {
		return nil, errors.New("malformed binary value")
	}
	if len(out) > MaxBinaryLen {
		return nil, fmt.Errorf("binary value longer than %d bytes", MaxBinaryLen)
	}
	return out, nil
}

// EncodeHex writes b as an RFC 7143 hex binary-value, which every initiator reads.
func EncodeHex(b []byte) string { return "0x" + hex.EncodeToString(b) }

// Credentials are what one target (or a tenant's discovery) requires: the initiator proves
// it knows Secret under User; with Mutual set, the target answers the initiator's challenge
// as MutualUser with MutualSecret.
type Credentials struct {
	User         string
	Secret       Secret
	MutualUser   string
	MutualSecret Secret
	// Algorithms allowed, in preference order; empty means DefaultAlgorithms.
	Algorithms []Algorithm
}

// Mutual reports whether the target can authenticate itself to the initiator.
func (c *Credentials) Mutual() bool { return c.MutualUser != "" && !c.MutualSecret.IsZero() }

// Prefs is the effective preference list.
func (c *Credentials) Prefs() []Algorithm {
	if len(c.Algorithms) > 0 {
		return c.Algorithms
	}
	return DefaultAlgorithms
}

// Choose picks the first algorithm of ours that the initiator offered.
func (c *Credentials) Choose(offered []Algorithm) (Algorithm, bool) {
	for _, a := range c.Prefs() {
		for _, o := range offered {
			if a == o {
				return a, true
			}
		}
	}
	return 0, false
}

// Equal reports whether two credential sets are the same (nil equals only nil); secrets are
// compared in constant time. Use it instead of reflect.DeepEqual, which never finds two
// Secrets equal (their bytes live in a closure).
func (c *Credentials) Equal(o *Credentials) bool {
	if c == nil || o == nil {
		return c == o
	}
	if c.User != o.User || c.MutualUser != o.MutualUser || len(c.Algorithms) != len(o.Algorithms) {
		return false
	}
	for i := range c.Algorithms {
		if c.Algorithms[i] != o.Algorithms[i] {
			return false
		}
	}
	sameSecret := c.Secret.Equal(o.Secret) || c.Secret.IsZero() && o.Secret.IsZero()
	sameMutual := c.MutualSecret.Equal(o.MutualSecret) || c.MutualSecret.IsZero() && o.MutualSecret.IsZero()
	return sameSecret && sameMutual
}
