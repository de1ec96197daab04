package conf

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"unicode/utf8"

	"nstarget/target/chap"
)

// isSecretKey reports whether a dotted key names an inline secret.
func isSecretKey(key string) bool {
	last := key[strings.LastIndexByte(key, '.')+1:]
	return last == "secret" || last == "mutual_secret"
}

// maxSecretFile bounds how much of a secret file is read: a secret is at most
// chap.MaxSecretLen bytes and a trailing newline.
const maxSecretFile = 4096

// chapTable reads a [tenant.target.chap] or [tenant.discovery_chap] table. algs is the
// tenant's chap_algorithms (nil: chap.DefaultAlgorithms). Error messages describe secrets
// (their length, the file's owner and mode), never their bytes.
func (v *validator) chapTable(t *table, algs []chap.Algorithm) *chap.Credentials {
	c := &chap.Credentials{Algorithms: algs}
	c.User = t.str("user", "", true)
	if _, set := t.m["user"]; set {
		if err := checkCHAPName(c.User); err != nil {
			v.errorf(t.key("user"), "%v", err)
		}
	}
	c.Secret = v.secret(t, "secret", "secret_file", true)
	mu, muSet := t.m["mutual_user"]
	c.MutualUser = t.str("mutual_user", "", false)
	if muSet {
		if _, ok := mu.(string); ok {
			if err := checkCHAPName(c.MutualUser); err != nil {
				v.errorf(t.key("mutual_user"), "%v", err)
			}
		}
	}
	c.MutualSecret = v.secret(t, "mutual_secret", "mutual_secret_file", false)
	switch {
	case muSet && c.MutualSecret.IsZero() && !v.reported(t, "mutual_secret", "mutual_secret_file"):
		v.errorf(t.key("mutual_user"), "mutual_user needs mutual_secret or mutual_secret_file")
	case !muSet && (hasKey(t, "mutual_secret") || hasKey(t, "mutual_secret_file")):
		v.errorf(t.key(firstSet(t, "mutual_secret", "mutual_secret_file")), "a mutual secret needs mutual_user")
	case c.Secret.Equal(c.MutualSecret):
		// RFC 7143 §12.1.3: one secret in both directions lets an attacker reflect the
		// target's challenge back to it.
		v.errorf(t.key(firstSet(t, "mutual_secret", "mutual_secret_file")), "the mutual secret must differ from the secret")
	}
	if x, ok := t.get("algorithms"); ok {
		c.Algorithms = v.algorithms(t.key("algorithms"), x)
	}
	t.done()
	return c
}

func hasKey(t *table, k string) bool { _, ok := t.m[k]; return ok }

func firstSet(t *table, keys ...string) string {
	for _, k := range keys {
		if hasKey(t, k) {
			return k
		}
	}
	return keys[0]
}

// reported reports whether a secret key of t is present (so its own error was reported).
func (v *validator) reported(t *table, keys ...string) bool {
	for _, k := range keys {
		if hasKey(t, k) {
			return true
		}
	}
	return false
}

// algorithms reads a list of CHAP algorithm names, in preference order.
func (v *validator) algorithms(key string, x any) []chap.Algorithm {
	arr, ok := x.([]any)
	if !ok {
		v.errorf(key, "must be an array of algorithm names, not %s", tomlType(x))
		return nil
	}
	if len(arr) == 0 {
		v.errorf(key, "must name at least one algorithm (MD5, SHA-1, SHA-256, SHA3-256)")
		return nil
	}
	var out []chap.Algorithm
	seen := map[chap.Algorithm]bool{}
	for i, e := range arr {
		s, ok := e.(string)
		if !ok {
			v.errorf(key, "element %d must be a string, not %s", i, tomlType(e))
			continue
		}
		a, err := chap.ParseAlgorithm(s)
		if err != nil {
			v.errorf(key, "%v", err)
			continue
		}
		if seen[a] {
			v.errorf(key, "algorithm %s listed twice", a)
			continue
		}
		seen[a] = true
		out = append(out, a)
	}
	return out
}

// secret reads an inline secret (key) or a secret file (fileKey): exactly one of them, when
// required.
func (v *validator) secret(t *table, key, fileKey string, required bool) chap.Secret {
	_, inline := t.m[key]
	_, file := t.m[fileKey]
	switch {
	case inline && file:
		v.errorf(t.key(fileKey), "set %s or %s, not both", key, fileKey)
		t.get(key)
		t.get(fileKey)
		return chap.Secret{}
	case !inline && !file:
		t.get(key)
		if required {
			v.errorf(t.path, "missing required key %q (or %q)", key, fileKey)
		}
		return chap.Secret{}
	case inline:
		x, _ := t.get(key)
		s, ok := x.(string)
		if !ok {
			v.errorf(t.key(key), "must be a string, not %s", tomlType(x))
			return chap.Secret{}
		}
		if err := checkSecret([]byte(s)); err != nil {
			v.errorf(t.key(key), "%v", err)
			return chap.Secret{}
		}
		return chap.NewSecret([]byte(s))
	}
	path := t.str(fileKey, "", false)
	if path == "" {
		v.errorf(t.key(fileKey), "must not be empty")
		return chap.Secret{}
	}
	if !filepath.IsAbs(path) {
		path = filepath.Join(filepath.Dir(v.file), path)
	}
	b, err := readSecretFile(path)
	if err != nil {
		v.errorf(t.key(fileKey), "%v", err)
		return chap.Secret{}
	}
	return chap.NewSecret(b)
}

// readSecretFile reads a secret that only root may read: a file that anyone else can read
// or replace hands the tenant's storage to whoever can.
func readSecretFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("secret file %s is not a regular file", path)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || st.Uid != 0 {
		return nil, fmt.Errorf("secret file %s must be owned by root", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("secret file %s has mode %04o; group and others must have no access (chmod 600)", path, perm)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return nil, fmt.Errorf("secret file %s: %w", path, err)
	}
	if len(b) > maxSecretFile {
		return nil, fmt.Errorf("secret file %s is longer than %d bytes", path, maxSecretFile)
	}
	// Editors and `echo` end the file with a newline; it is not part of the secret.
	b = bytes.TrimSuffix(b, []byte("\n"))
	b = bytes.TrimSuffix(b, []byte("\r"))
	if err := checkSecret(b); err != nil {
		return nil, fmt.Errorf("secret file %s: %w", path, err)
	}
	return b, nil
}

func checkSecret(b []byte) error {
	switch {
	case len(b) < chap.MinSecretLen:
		return fmt.Errorf("secret is %d bytes; at least %d are required (RFC 7143 §12.1.3)", len(b), chap.MinSecretLen)
	case len(b) > chap.MaxSecretLen:
		return fmt.Errorf("secret is %d bytes; at most %d are allowed", len(b), chap.MaxSecretLen)
	case bytes.IndexByte(b, 0) >= 0:
		return errors.New("secret contains a NUL byte")
	}
	return nil
}

// checkCHAPName checks a CHAP user name: it travels as an iSCSI text value (UTF-8, no NUL).
func checkCHAPName(s string) error {
	switch {
	case s == "":
		return errors.New("must not be empty")
	case len(s) > 255:
		return fmt.Errorf("is %d bytes; at most 255 are allowed", len(s))
	case !utf8.ValidString(s):
		return errors.New("is not valid UTF-8")
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return errors.New("contains a control character")
		}
	}
	return nil
}
