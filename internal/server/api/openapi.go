package api

import _ "embed"

// openAPIDoc is the OpenAPI 3 document of the API, served at
// /api/v1/openapi.json. The tests hold it to the handler: every route in
// it and no other, and real responses valid against its schemas.
//
//go:embed openapi.json
var openAPIDoc []byte

// OpenAPI returns the OpenAPI document (a copy).
func OpenAPI() []byte { return append([]byte(nil), openAPIDoc...) }
