package repo

import "crypto/sha256"

func sha256Sum(p []byte) [32]byte { return sha256.Sum256(p) }
