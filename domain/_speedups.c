/* asyncapy.domain._speedups: the codecs' fast paths, in C.
 *
 * domain/codecs.py holds the codecs; this module only accelerates them, and every
 * rule it applies is the codec's (see the ZiProtoCodec and JsonCodec docstrings).
 *
 * ZiProto is the MessagePack subset of nil, bool, int (64 bits), float, str, bin,
 * array and map:
 *
 *   decode(error, over_error, max_depth, max_units, data) -> dict
 *       Parses one whole ZiProto value from a bytes-like object, which must be a map.
 *       Raises ``error`` (the codec's CodecError) with a message for anything else:
 *       a value that is not a map, and what is not a value at all: truncated or
 *       trailing bytes, the unused type byte 0xc1, any MessagePack extension type
 *       (ZiProto has none), a string that is not UTF-8, an array or a map used as a
 *       map key (keys are scalars: a container key would decode to a tuple, whose
 *       hash has no secret and can be made to collide), containers nested deeper
 *       than max_depth (the top level is 1). Raises ``over_error`` (a subclass of
 *       ``error``) when the payload holds more than max_units elements (every value
 *       counts one: containers, map keys, array items). Arrays become lists; maps
 *       become dicts (a repeated key keeps its last value); bin becomes bytes;
 *       float32 and float64 become float.
 *
 *   decode_units(error, over_error, max_depth, max_units, data) -> (dict, units)
 *       The same, with the count of elements decoded.
 *
 *   encode(fallback, max_depth, obj) -> bytes
 *       Writes the smallest representation of every value, as the reference
 *       ziproto.encode and msgspec do byte for byte: positive fixint, uint 8/16/32/64
 *       for non-negative ints; negative fixint, int 8/16/32/64 for negative ones;
 *       float64 for every float; fixstr/str8/16/32; bin8/16/32; fixarray/array16/32;
 *       fixmap/map16/32. Only the exact built-in types are handled here (dict, list,
 *       tuple, str, bytes, int, float, bool, None); for anything else (a subclass, a
 *       bytearray, an int beyond 64 bits, a string with lone surrogates, nesting
 *       deeper than max_depth) it returns ``fallback(obj)``, and the codec encodes the
 *       value with msgspec instead, which accepts or refuses it exactly as before.
 *
 * JSON:
 *
 *   json_nests_beyond(max_depth, data) -> bool
 *       Whether the brackets of a JSON text nest deeper than max_depth outside its
 *       strings: for a text that parsed, the depth of its value, in one pass.
 *
 *   encode_json(fallback, max_depth, obj) -> bytes
 *       What ``json.dumps(obj).encode("ascii")`` gives, byte for byte: ", " and ": "
 *       separators, every character outside printable ASCII escaped as \uXXXX
 *       (lowercase hex, a surrogate pair above U+FFFF) or its short escape, floats
 *       as repr() writes them, NaN and Infinity as the standard library writes them.
 *       Only dicts with exact str keys, lists, tuples, exact str, int (64 bits), float,
 *       bool and None are handled here; for anything else (a non-str key, a subclass,
 *       a bigger int, nesting deeper than max_depth) it returns ``fallback(obj)``: the
 *       standard library's encoder, which accepts or refuses it as before.
 *
 * No function runs Python code (no __hash__, __eq__ or __repr__ of ours is called on
 * exact built-in types), so none can be re-entered, and the encoders' scratch buffer
 * is shared by all calls under the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------ decoding */

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
    const unsigned char *start;
    int max_depth;
    Py_ssize_t units_left;  /* values still allowed (see max_units) */
    int over;               /* set when they ran out */
} Decoder;

/* A payload at least this long is decoded with the cyclic garbage collector paused:
 * a collection walks every container allocated so far, and a payload of a million
 * arrays made it run often enough to cost five times the decoding itself. The
 * containers are still counted, so the first collection after it walks them once. */
#define GC_PAUSE_AT (64 * 1024)

/* Short ASCII strings (keys above all, and repeated values) are looked up in a small
 * direct-mapped cache before one is made: a hit costs a hash and a compare of up to
 * three words instead of an allocation, and the string's own hash is already
 * computed for the dict it goes into. One-character strings have a table of their own. */
#define STR_CACHE_SIZE 1024
#define STR_CACHE_MAX_LEN 24
typedef struct {
    PyObject *str;
    uint64_t words[3];  /* the bytes, zero-padded */
    Py_ssize_t len;
} CachedStr;
static CachedStr str_cache[STR_CACHE_SIZE];
static PyObject *one_char[128];

static PyObject *
malformed(Decoder *d, const char *what)
{
    PyErr_Format(PyExc_ValueError, "%s (byte %zd)", what, (Py_ssize_t)(d->p - d->start));
    return NULL;
}

static PyObject *
truncated(void)
{
    PyErr_SetString(PyExc_ValueError, "the payload is truncated");
    return NULL;
}

static inline int
is_ascii(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    uint64_t acc = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, s + i, 8);
        acc |= word;
    }
    for (; i < n; i++) acc |= s[i];
    return (acc & UINT64_C(0x8080808080808080)) == 0;
}

static PyObject *
new_ascii(const unsigned char *s, Py_ssize_t n)
{
    PyObject *str = PyUnicode_New(n, 127);
    if (str != NULL) memcpy(PyUnicode_1BYTE_DATA(str), s, n);
    return str;
}

static PyObject *
make_str(Decoder *d, const unsigned char *s, Py_ssize_t n)
{
    if (n == 1 && s[0] < 128) {
        PyObject **slot = &one_char[s[0]];
        if (*slot == NULL && (*slot = new_ascii(s, 1)) == NULL) return NULL;
        Py_INCREF(*slot);
        return *slot;
    }
    if (n <= STR_CACHE_MAX_LEN) {
        uint64_t words[3] = {0, 0, 0};
        memcpy(words, s, n);
        if (((words[0] | words[1] | words[2]) & UINT64_C(0x8080808080808080)) == 0) {
            uint64_t h = (words[0] * UINT64_C(0x9E3779B97F4A7C15))
                       ^ (words[1] * UINT64_C(0xC2B2AE3D27D4EB4F))
                       ^ (words[2] * UINT64_C(0x165667B19E3779F9)) ^ (uint64_t)n;
            h ^= h >> 29;
            h *= UINT64_C(0xBF58476D1CE4E5B9);
            CachedStr *entry = &str_cache[(h >> 32) & (STR_CACHE_SIZE - 1)];
            if (entry->str != NULL && entry->len == n && entry->words[0] == words[0]
                    && entry->words[1] == words[1] && entry->words[2] == words[2]) {
                Py_INCREF(entry->str);
                return entry->str;
            }
            PyObject *str = new_ascii(s, n);
            if (str == NULL) return NULL;
            Py_INCREF(str);
            Py_XSETREF(entry->str, str);
            memcpy(entry->words, words, sizeof words);
            entry->len = n;
            return str;
        }
    } else if (is_ascii(s, n)) {
        return new_ascii(s, n);
    }
    PyObject *str = PyUnicode_DecodeUTF8((const char *)s, n, "strict");
    if (str == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return malformed(d, "a string is not valid UTF-8");
        }
        return NULL;
    }
    return str;
}

static inline uint16_t load16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t load32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t load64(const unsigned char *p) {
    return ((uint64_t)load32(p) << 32) | load32(p + 4);
}

/* Take n bytes of payload; NULL (with the exception set) when fewer are left. */
static inline const unsigned char *
take(Decoder *d, Py_ssize_t n)
{
    if (d->end - d->p < n) {
        truncated();
        return NULL;
    }
    const unsigned char *s = d->p;
    d->p += n;
    return s;
}

static PyObject *decode_value(Decoder *d, int depth);

/* fixmap, fixarray, array 16/32, map 16/32 */
static inline int
is_container_op(unsigned char op)
{
    return (op >= 0x80 && op <= 0x9f) || (op >= 0xdc && op <= 0xdf);
}

static PyObject *
decode_array(Decoder *d, Py_ssize_t n, int depth)
{
    if (depth > d->max_depth) return malformed(d, "the payload nests too deeply");
    /* Every element takes a byte at least: a count the rest cannot hold is a lie,
     * refused before anything is allocated for it. */
    if (n > d->end - d->p) return truncated();
    PyObject *seq = PyList_New(n);
    if (seq == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = decode_value(d, depth + 1);
        if (item == NULL) {
            Py_DECREF(seq);
            return NULL;
        }
        PyList_SET_ITEM(seq, i, item);
    }
    return seq;
}

static PyObject *
decode_map(Decoder *d, Py_ssize_t n, int depth)
{
    if (depth > d->max_depth) return malformed(d, "the payload nests too deeply");
    if (n > (d->end - d->p) / 2) return truncated();
#if PY_VERSION_HEX < 0x030D0000
    PyObject *map = _PyDict_NewPresized(n);
#else
    PyObject *map = PyDict_New();
#endif
    if (map == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* A key is a scalar: an array or a map there is refused before it is
         * decoded (see the header comment). */
        if (d->p < d->end && is_container_op(*d->p)) {
            malformed(d, "a map key is an array or a map; keys must be scalars");
            goto error;
        }
        PyObject *key = decode_value(d, depth + 1);
        if (key == NULL) goto error;
        PyObject *value = decode_value(d, depth + 1);
        if (value == NULL) {
            Py_DECREF(key);
            goto error;
        }
        int failed = PyDict_SetItem(map, key, value);
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed) {
            if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                malformed(d, "map keys must be hashable");
            }
            goto error;
        }
    }
    return map;
error:
    Py_DECREF(map);
    return NULL;
}

static PyObject *
decode_value(Decoder *d, int depth)
{
    const unsigned char *s;
    if (d->p >= d->end) return truncated();
    if (--d->units_left < 0) {
        d->over = 1;
        return malformed(d, "the payload holds more elements than allowed");
    }
    unsigned char op = *d->p++;
    if (op <= 0x7f) return PyLong_FromLong(op);
    if (op >= 0xe0) return PyLong_FromLong((long)(int8_t)op);
    if (op <= 0x8f) return decode_map(d, op & 0x0f, depth);
    if (op <= 0x9f) return decode_array(d, op & 0x0f, depth);
    if (op <= 0xbf) {
        Py_ssize_t n = op & 0x1f;
        if ((s = take(d, n)) == NULL) return NULL;
        return make_str(d, s, n);
    }
    switch (op) {
    case 0xc0: Py_RETURN_NONE;
    case 0xc2: Py_RETURN_FALSE;
    case 0xc3: Py_RETURN_TRUE;
    case 0xc4: case 0xc5: case 0xc6: {
        Py_ssize_t width = op == 0xc4 ? 1 : op == 0xc5 ? 2 : 4;
        if ((s = take(d, width)) == NULL) return NULL;
        Py_ssize_t n = width == 1 ? s[0] : width == 2 ? load16(s) : (Py_ssize_t)load32(s);
        if ((s = take(d, n)) == NULL) return NULL;
        return PyBytes_FromStringAndSize((const char *)s, n);
    }
    case 0xca: {
        if ((s = take(d, 4)) == NULL) return NULL;
        uint32_t bits = load32(s);
        float f;
        memcpy(&f, &bits, 4);
        return PyFloat_FromDouble((double)f);
    }
    case 0xcb: {
        if ((s = take(d, 8)) == NULL) return NULL;
        uint64_t bits = load64(s);
        double f;
        memcpy(&f, &bits, 8);
        return PyFloat_FromDouble(f);
    }
    case 0xcc: if ((s = take(d, 1)) == NULL) return NULL; return PyLong_FromLong(s[0]);
    case 0xcd: if ((s = take(d, 2)) == NULL) return NULL; return PyLong_FromLong(load16(s));
    case 0xce: if ((s = take(d, 4)) == NULL) return NULL; return PyLong_FromUnsignedLong(load32(s));
    case 0xcf: if ((s = take(d, 8)) == NULL) return NULL; return PyLong_FromUnsignedLongLong(load64(s));
    case 0xd0: if ((s = take(d, 1)) == NULL) return NULL; return PyLong_FromLong((int8_t)s[0]);
    case 0xd1: if ((s = take(d, 2)) == NULL) return NULL; return PyLong_FromLong((int16_t)load16(s));
    case 0xd2: if ((s = take(d, 4)) == NULL) return NULL; return PyLong_FromLong((long)(int32_t)load32(s));
    case 0xd3: if ((s = take(d, 8)) == NULL) return NULL; return PyLong_FromLongLong((long long)(int64_t)load64(s));
    case 0xd9: case 0xda: case 0xdb: {
        Py_ssize_t width = op == 0xd9 ? 1 : op == 0xda ? 2 : 4;
        if ((s = take(d, width)) == NULL) return NULL;
        Py_ssize_t n = width == 1 ? s[0] : width == 2 ? load16(s) : (Py_ssize_t)load32(s);
        if ((s = take(d, n)) == NULL) return NULL;
        return make_str(d, s, n);
    }
    case 0xdc: case 0xdd: {
        Py_ssize_t width = op == 0xdc ? 2 : 4;
        if ((s = take(d, width)) == NULL) return NULL;
        return decode_array(d, width == 2 ? load16(s) : (Py_ssize_t)load32(s), depth);
    }
    case 0xde: case 0xdf: {
        Py_ssize_t width = op == 0xde ? 2 : 4;
        if ((s = take(d, width)) == NULL) return NULL;
        return decode_map(d, width == 2 ? load16(s) : (Py_ssize_t)load32(s), depth);
    }
    case 0xc1:
        d->p--;
        return malformed(d, "0xc1 is not a type byte");
    default: {
        /* 0xc7-0xc9 (ext 8/16/32) and 0xd4-0xd8 (fixext 1-16): the type follows the
         * length (ext) or the opcode (fixext). */
        Py_ssize_t skip = op == 0xc7 ? 1 : op == 0xc8 ? 2 : op == 0xc9 ? 4 : 0;
        d->p--;
        if (d->end - d->p > 1 + skip) {
            PyErr_Format(PyExc_ValueError,
                         "MessagePack extension type %d is not part of ZiProto (byte %zd)",
                         (int)(int8_t)d->p[1 + skip], (Py_ssize_t)(d->p - d->start));
            return NULL;
        }
        return malformed(d, "a MessagePack extension type, which is not part of ZiProto");
    }
    }
}

static long
depth_argument(PyObject *arg)
{
    long max_depth = PyLong_AsLong(arg);
    if (max_depth == -1 && PyErr_Occurred()) return -1;
    if (max_depth < 1 || max_depth > 100000) {
        PyErr_SetString(PyExc_ValueError, "max_depth must be from 1 to 100000");
        return -1;
    }
    return max_depth;
}

/* The map ``data`` holds, decoding at most max_units values; *units is set to the
 * count decoded. Anything else raises ``error`` (the codec's CodecError) with
 * "malformed ZiProto: <what>" or "ZiProto payload is a <type>, not a map", or
 * ``over_error`` when the values ran out. */
static PyObject *
decode_counted(PyObject *const *args, Py_ssize_t nargs, const char *usage, Py_ssize_t *units)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "%s takes 5 arguments", usage);
        return NULL;
    }
    long max_depth = depth_argument(args[2]);
    if (max_depth < 0) return NULL;
    Py_ssize_t max_units = PyLong_AsSsize_t(args[3]);
    if (max_units == -1 && PyErr_Occurred()) return NULL;
    if (max_units < 0) {
        PyErr_SetString(PyExc_ValueError, "max_units must be at least 0");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[4], &view, PyBUF_SIMPLE) < 0) return NULL;
    Decoder d = {view.buf, (const unsigned char *)view.buf + view.len, view.buf,
                 (int)max_depth, max_units, 0};
    int gc_paused = view.len >= GC_PAUSE_AT ? PyGC_Disable() : 0;
    PyObject *result = decode_value(&d, 1);
    if (gc_paused) PyGC_Enable();
    if (result != NULL && d.p != d.end) {
        Py_CLEAR(result);
        malformed(&d, "trailing bytes after the value");
    }
    PyBuffer_Release(&view);
    if (result == NULL) {
        if (PyErr_ExceptionMatches(PyExc_ValueError)) {
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyObject *text = value != NULL ? PyObject_Str(value) : NULL;
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(traceback);
            if (text == NULL) return NULL;
            if (d.over) {
                PyErr_Format(args[1], "malformed ZiProto: more than %zd elements (byte %zd)",
                             max_units, (Py_ssize_t)(d.p - d.start));
            } else {
                PyErr_Format(args[0], "malformed ZiProto: %U", text);
            }
            Py_DECREF(text);
        }
        return NULL;
    }
    if (!PyDict_CheckExact(result)) {
        PyErr_Format(args[0], "ZiProto payload is a %s, not a map", Py_TYPE(result)->tp_name);
        Py_DECREF(result);
        return NULL;
    }
    *units = max_units - d.units_left;
    return result;
}

/* decode(error, over_error, max_depth, max_units, data): the map ``data`` holds. */
static PyObject *
ziproto_decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t units;
    return decode_counted(args, nargs, "decode(error, over_error, max_depth, max_units, data)", &units);
}

/* decode_units(error, over_error, max_depth, max_units, data): (map, values decoded). */
static PyObject *
ziproto_decode_units(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t units;
    PyObject *map = decode_counted(
        args, nargs, "decode_units(error, over_error, max_depth, max_units, data)", &units);
    if (map == NULL) return NULL;
    PyObject *count = PyLong_FromSsize_t(units);
    if (count == NULL) {
        Py_DECREF(map);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, map, count);
    Py_DECREF(map);
    Py_DECREF(count);
    return pair;
}

/* ------------------------------------------------------------------ encoding */

typedef struct {
    char *buf;
    Py_ssize_t len;
    Py_ssize_t cap;
    int max_depth;
} Encoder;

#define SCRATCH_START 4096
#define SCRATCH_KEEP (1 << 20)
static char *scratch;
static Py_ssize_t scratch_cap;

/* Return codes of the encoder's functions. */
#define ENC_OK 0
#define ENC_ERROR -1       /* an exception is set (out of memory) */
#define ENC_UNHANDLED 1    /* not for this fast path: the codec's fallback takes it */

static int
reserve(Encoder *e, Py_ssize_t extra)
{
    if (e->len + extra <= e->cap) return ENC_OK;
    Py_ssize_t cap = e->cap;
    while (cap < e->len + extra) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return ENC_ERROR;
        }
        cap *= 2;
    }
    char *grown = PyMem_Realloc(e->buf, cap);
    if (grown == NULL) {
        PyErr_NoMemory();
        return ENC_ERROR;
    }
    e->buf = grown;
    e->cap = cap;
    return ENC_OK;
}

/* Writers: reserve() first; each writes through a local pointer (a store through
 * the buffer's char pointer could alias the Encoder, which would make the compiler
 * reload it after every byte). */
static inline void put8(Encoder *e, unsigned char b) { e->buf[e->len++] = (char)b; }
static inline void put_op16(Encoder *e, unsigned char op, uint16_t v) {
    unsigned char *out = (unsigned char *)e->buf + e->len;
    out[0] = op; out[1] = (unsigned char)(v >> 8); out[2] = (unsigned char)v;
    e->len += 3;
}
static inline void put_op32(Encoder *e, unsigned char op, uint32_t v) {
    unsigned char *out = (unsigned char *)e->buf + e->len;
    out[0] = op; out[1] = (unsigned char)(v >> 24); out[2] = (unsigned char)(v >> 16);
    out[3] = (unsigned char)(v >> 8); out[4] = (unsigned char)v;
    e->len += 5;
}
static inline void put_op64(Encoder *e, unsigned char op, uint64_t v) {
    unsigned char *out = (unsigned char *)e->buf + e->len;
    out[0] = op;
    for (int i = 0; i < 8; i++) out[1 + i] = (unsigned char)(v >> (56 - 8 * i));
    e->len += 9;
}

/* A header of a sized item: the fix form (fix_base | n, when n < fix_limit), else
 * the 8-, 16- or 32-bit one (op8 may be 0: no 8-bit form). ``extra`` more bytes are
 * reserved for what follows. */
static inline int
put_header(Encoder *e, Py_ssize_t n, unsigned char fix_base, Py_ssize_t fix_limit,
           unsigned char op8, unsigned char op16, unsigned char op32, Py_ssize_t extra)
{
    if (e->len + 5 + extra > e->cap && reserve(e, 5 + extra) < 0) return ENC_ERROR;
    unsigned char *out = (unsigned char *)e->buf + e->len;
    if (n < fix_limit) {
        out[0] = (unsigned char)(fix_base | n);
        e->len += 1;
    } else if (op8 && n < 256) {
        out[0] = op8;
        out[1] = (unsigned char)n;
        e->len += 2;
    } else if (n < 65536) {
        put_op16(e, op16, (uint16_t)n);
    } else if ((uint64_t)n <= UINT32_MAX) {
        put_op32(e, op32, (uint32_t)n);
    } else {
        return ENC_UNHANDLED;  /* over 4 GiB: the fallback refuses it as before */
    }
    return ENC_OK;
}

static inline void
put_bytes(Encoder *e, const char *data, Py_ssize_t n)
{
    memcpy(e->buf + e->len, data, n);
    e->len += n;
}

static int
encode_int(Encoder *e, PyObject *obj)
{
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (x == -1 && PyErr_Occurred()) return ENC_ERROR;
    if (e->len + 9 > e->cap && reserve(e, 9) < 0) return ENC_ERROR;
    if (overflow > 0) {
        unsigned long long u = PyLong_AsUnsignedLongLong(obj);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();  /* beyond 64 bits: the fallback refuses it as before */
            return ENC_UNHANDLED;
        }
        put_op64(e, 0xcf, u);
    } else if (overflow < 0) {
        return ENC_UNHANDLED;
    } else if (x >= 0) {
        if (x < 128) put8(e, (unsigned char)x);
        else if (x < 256) { put8(e, 0xcc); put8(e, (unsigned char)x); }
        else if (x < 65536) put_op16(e, 0xcd, (uint16_t)x);
        else if (x <= (long long)UINT32_MAX) put_op32(e, 0xce, (uint32_t)x);
        else put_op64(e, 0xcf, (uint64_t)x);
    } else {
        if (x >= -32) put8(e, (unsigned char)(int8_t)x);
        else if (x >= INT8_MIN) { put8(e, 0xd0); put8(e, (unsigned char)(int8_t)x); }
        else if (x >= INT16_MIN) put_op16(e, 0xd1, (uint16_t)(int16_t)x);
        else if (x >= INT32_MIN) put_op32(e, 0xd2, (uint32_t)(int32_t)x);
        else put_op64(e, 0xd3, (uint64_t)x);
    }
    return ENC_OK;
}

static int encode_value(Encoder *e, PyObject *obj, int depth);

static int
encode_value(Encoder *e, PyObject *obj, int depth)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *data;
        if (PyUnicode_IS_COMPACT_ASCII(obj)) {
            n = PyUnicode_GET_LENGTH(obj);
            data = (const char *)PyUnicode_1BYTE_DATA(obj);
        } else {
            data = PyUnicode_AsUTF8AndSize(obj, &n);
            if (data == NULL) {
                PyErr_Clear();  /* lone surrogates: the fallback says so */
                return ENC_UNHANDLED;
            }
        }
        int rc = put_header(e, n, 0xa0, 32, 0xd9, 0xda, 0xdb, n);
        if (rc != ENC_OK) return rc;
        put_bytes(e, data, n);
        return ENC_OK;
    }
    if (type == &PyLong_Type) return encode_int(e, obj);
    if (type == &PyDict_Type) {
        if (depth > e->max_depth) return ENC_UNHANDLED;
        int rc = put_header(e, PyDict_GET_SIZE(obj), 0x80, 16, 0, 0xde, 0xdf, 0);
        if (rc != ENC_OK) return rc;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(obj, &pos, &key, &value)) {
            if ((rc = encode_value(e, key, depth + 1)) != ENC_OK) return rc;
            if ((rc = encode_value(e, value, depth + 1)) != ENC_OK) return rc;
        }
        return ENC_OK;
    }
    if (type == &PyList_Type || type == &PyTuple_Type) {
        if (depth > e->max_depth) return ENC_UNHANDLED;
        Py_ssize_t n = Py_SIZE(obj);
        PyObject **items = type == &PyList_Type ? ((PyListObject *)obj)->ob_item
                                                : ((PyTupleObject *)obj)->ob_item;
        int rc = put_header(e, n, 0x90, 16, 0, 0xdc, 0xdd, 0);
        if (rc != ENC_OK) return rc;
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((rc = encode_value(e, items[i], depth + 1)) != ENC_OK) return rc;
        }
        return ENC_OK;
    }
    if (type == &PyFloat_Type) {
        if (e->len + 9 > e->cap && reserve(e, 9) < 0) return ENC_ERROR;
        double f = PyFloat_AS_DOUBLE(obj);
        uint64_t bits;
        memcpy(&bits, &f, 8);
        put_op64(e, 0xcb, bits);
        return ENC_OK;
    }
    if (obj == Py_None || obj == Py_True || obj == Py_False) {
        if (e->len + 1 > e->cap && reserve(e, 1) < 0) return ENC_ERROR;
        put8(e, obj == Py_None ? 0xc0 : obj == Py_True ? 0xc3 : 0xc2);
        return ENC_OK;
    }
    if (type == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(obj);
        int rc = put_header(e, n, 0, 0, 0xc4, 0xc5, 0xc6, n);
        if (rc != ENC_OK) return rc;
        put_bytes(e, PyBytes_AS_STRING(obj), n);
        return ENC_OK;
    }
    return ENC_UNHANDLED;
}

/* The scratch buffer for one encoding call: taken by start_encoding(), given back by
 * finish_encoding(), which also makes the result: the bytes written, or
 * ``fallback(obj)`` for a value only the fallback handles. */
static int
start_encoding(Encoder *e, PyObject *depth_arg)
{
    long max_depth = depth_argument(depth_arg);
    if (max_depth < 0) return -1;
    if (scratch == NULL) {
        scratch = PyMem_Malloc(SCRATCH_START);
        if (scratch == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        scratch_cap = SCRATCH_START;
    }
    e->buf = scratch;
    e->len = 0;
    e->cap = scratch_cap;
    e->max_depth = (int)max_depth;
    return 0;
}

static PyObject *
finish_encoding(Encoder *e, int rc, PyObject *fallback, PyObject *obj)
{
    PyObject *result = NULL;
    if (rc == ENC_OK) result = PyBytes_FromStringAndSize(e->buf, e->len);
    /* The scratch buffer is kept for the next call, unless one huge payload grew it. */
    if (e->cap > SCRATCH_KEEP) {
        PyMem_Free(e->buf);
        scratch = NULL;
        scratch_cap = 0;
    } else {
        scratch = e->buf;
        scratch_cap = e->cap;
    }
    if (rc == ENC_UNHANDLED) result = PyObject_CallOneArg(fallback, obj);
    return result;
}

/* An encoder's entry point, (fallback, max_depth, obj): what ``write`` makes of
 * ``obj`` at depth 1, or ``fallback(obj)`` for a value only the fallback handles. */
static PyObject *
encode_with(int (*write)(Encoder *, PyObject *, int), const char *usage,
            PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s takes 3 arguments", usage);
        return NULL;
    }
    Encoder e;
    if (start_encoding(&e, args[1]) < 0) return NULL;
    return finish_encoding(&e, write(&e, args[2], 1), args[0], args[2]);
}

/* encode(fallback, max_depth, obj): the ZiProto bytes of ``obj``. */
static PyObject *
ziproto_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return encode_with(encode_value, "encode(fallback, max_depth, obj)", args, nargs);
}

/* ------------------------------------------------------------------ JSON encoding */

static const char hexdigits[] = "0123456789abcdef";

/* Printable ASCII that JSON writes as itself: what json's encoder calls S_CHAR. */
static inline int
json_plain(Py_UCS4 c)
{
    return c >= ' ' && c <= '~' && c != '\\' && c != '"';
}

/* One character that needs an escape, written as the standard library's
 * ascii_escape_unichar writes it; at most 12 bytes (room reserved by the caller). */
static inline unsigned char *
json_escape(unsigned char *out, Py_UCS4 c)
{
    *out++ = '\\';
    switch (c) {
    case '\\': *out++ = '\\'; return out;
    case '"': *out++ = '"'; return out;
    case '\b': *out++ = 'b'; return out;
    case '\f': *out++ = 'f'; return out;
    case '\n': *out++ = 'n'; return out;
    case '\r': *out++ = 'r'; return out;
    case '\t': *out++ = 't'; return out;
    }
    if (c >= 0x10000) {
        Py_UCS4 high = Py_UNICODE_HIGH_SURROGATE(c);
        *out++ = 'u';
        *out++ = hexdigits[(high >> 12) & 0xf];
        *out++ = hexdigits[(high >> 8) & 0xf];
        *out++ = hexdigits[(high >> 4) & 0xf];
        *out++ = hexdigits[high & 0xf];
        c = Py_UNICODE_LOW_SURROGATE(c);
        *out++ = '\\';
    }
    *out++ = 'u';
    *out++ = hexdigits[(c >> 12) & 0xf];
    *out++ = hexdigits[(c >> 8) & 0xf];
    *out++ = hexdigits[(c >> 4) & 0xf];
    *out++ = hexdigits[c & 0xf];
    return out;
}

static int
json_str(Encoder *e, PyObject *obj)
{
    if (PyUnicode_READY(obj) < 0) return ENC_ERROR;
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    int kind = PyUnicode_KIND(obj);
    const void *data = PyUnicode_DATA(obj);
    if (kind == PyUnicode_1BYTE_KIND) {
        /* Most strings need no escape at all: one scan, one copy. */
        const unsigned char *s = data;
        Py_ssize_t i = 0;
        while (i < n && json_plain(s[i])) i++;
        if (i == n) {
            if (e->len + n + 2 > e->cap && reserve(e, n + 2) < 0) return ENC_ERROR;
            unsigned char *out = (unsigned char *)e->buf + e->len;
            *out++ = '"';
            memcpy(out, s, n);
            out[n] = '"';
            e->len += n + 2;
            return ENC_OK;
        }
    }
    if (e->len + 2 > e->cap && reserve(e, 2) < 0) return ENC_ERROR;
    e->buf[e->len++] = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (e->len + 13 > e->cap && reserve(e, 13) < 0) return ENC_ERROR;
        unsigned char *out = (unsigned char *)e->buf + e->len;
        if (json_plain(c)) *out++ = (unsigned char)c;
        else out = json_escape(out, c);
        e->len = (char *)out - e->buf;
    }
    e->buf[e->len++] = '"';
    return ENC_OK;
}

static inline int
json_literal(Encoder *e, const char *text, Py_ssize_t n)
{
    if (e->len + n > e->cap && reserve(e, n) < 0) return ENC_ERROR;
    put_bytes(e, text, n);
    return ENC_OK;
}

static int
json_int(Encoder *e, PyObject *obj)
{
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (x == -1 && PyErr_Occurred()) return ENC_ERROR;
    if (overflow) return ENC_UNHANDLED;  /* beyond 64 bits: the fallback writes it */
    char digits[24];
    char *end = digits + sizeof digits, *p = end;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (x < 0) *--p = '-';
    return json_literal(e, p, end - p);
}

static int
json_float(Encoder *e, PyObject *obj)
{
    double f = PyFloat_AS_DOUBLE(obj);
    if (Py_IS_NAN(f)) return json_literal(e, "NaN", 3);
    if (Py_IS_INFINITY(f)) return f > 0 ? json_literal(e, "Infinity", 8) : json_literal(e, "-Infinity", 9);
    /* float.__repr__, which is what the standard library's encoder writes. */
    char *text = PyOS_double_to_string(f, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) return ENC_ERROR;
    int rc = json_literal(e, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return rc;
}

static int
json_value(Encoder *e, PyObject *obj, int depth)
{
    PyTypeObject *type = Py_TYPE(obj);
    if (type == &PyUnicode_Type) return json_str(e, obj);
    if (type == &PyLong_Type) return json_int(e, obj);
    if (obj == Py_True) return json_literal(e, "true", 4);
    if (obj == Py_False) return json_literal(e, "false", 5);
    if (obj == Py_None) return json_literal(e, "null", 4);
    if (type == &PyFloat_Type) return json_float(e, obj);
    int rc;
    if (type == &PyDict_Type) {
        if (depth > e->max_depth) return ENC_UNHANDLED;
        if ((rc = json_literal(e, "{", 1)) != ENC_OK) return rc;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        int first = 1;
        while (PyDict_Next(obj, &pos, &key, &value)) {
            if (!PyUnicode_CheckExact(key)) return ENC_UNHANDLED;  /* the fallback converts or refuses it */
            if (!first && (rc = json_literal(e, ", ", 2)) != ENC_OK) return rc;
            first = 0;
            if ((rc = json_str(e, key)) != ENC_OK) return rc;
            if ((rc = json_literal(e, ": ", 2)) != ENC_OK) return rc;
            if ((rc = json_value(e, value, depth + 1)) != ENC_OK) return rc;
        }
        return json_literal(e, "}", 1);
    }
    if (type == &PyList_Type || type == &PyTuple_Type) {
        if (depth > e->max_depth) return ENC_UNHANDLED;
        if ((rc = json_literal(e, "[", 1)) != ENC_OK) return rc;
        Py_ssize_t n = Py_SIZE(obj);
        PyObject **items = type == &PyList_Type ? ((PyListObject *)obj)->ob_item
                                                : ((PyTupleObject *)obj)->ob_item;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i && (rc = json_literal(e, ", ", 2)) != ENC_OK) return rc;
            if ((rc = json_value(e, items[i], depth + 1)) != ENC_OK) return rc;
        }
        return json_literal(e, "]", 1);
    }
    return ENC_UNHANDLED;
}

/* encode_json(fallback, max_depth, obj): json.dumps(obj) as ASCII bytes. */
static PyObject *
json_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return encode_with(json_value, "encode_json(fallback, max_depth, obj)", args, nargs);
}

/* ------------------------------------------------------------------ JSON nesting */

/* json_nests_beyond(max_depth, data) -> bool: whether the brackets of a JSON text,
 * outside its strings, nest deeper than max_depth (the top-level object is 1). For a
 * text that parsed, that is the depth of what it decoded to: one pass over the
 * bytes instead of a walk of every container built. */
static PyObject *
json_nests_beyond(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "json_nests_beyond(max_depth, data) takes 2 arguments");
        return NULL;
    }
    long max_depth = depth_argument(args[0]);
    if (max_depth < 0) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_SIMPLE) < 0) return NULL;
    const unsigned char *p = view.buf, *end = p + view.len;
    long depth = 0;
    int beyond = 0;
    while (p < end) {
        unsigned char c = *p++;
        if (c == '"') {
            while (p < end) {
                c = *p++;
                if (c == '\\') {
                    if (p < end) p++;
                } else if (c == '"') {
                    break;
                }
            }
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth) {
                beyond = 1;
                break;
            }
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(beyond);
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"decode", (PyCFunction)(void (*)(void))ziproto_decode, METH_FASTCALL,
     "decode(error, over_error, max_depth, max_units, data) -> dict: the ZiProto map data holds; raises error if none."},
    {"decode_units", (PyCFunction)(void (*)(void))ziproto_decode_units, METH_FASTCALL,
     "decode_units(error, over_error, max_depth, max_units, data) -> (dict, int): the map and its count of values."},
    {"encode", (PyCFunction)(void (*)(void))ziproto_encode, METH_FASTCALL,
     "encode(fallback, max_depth, obj) -> bytes: ZiProto; fallback(obj) for what it does not handle."},
    {"json_nests_beyond", (PyCFunction)(void (*)(void))json_nests_beyond, METH_FASTCALL,
     "json_nests_beyond(max_depth, data) -> bool: whether a JSON text's brackets nest deeper than max_depth."},
    {"encode_json", (PyCFunction)(void (*)(void))json_encode, METH_FASTCALL,
     "encode_json(fallback, max_depth, obj) -> bytes: json.dumps(obj), ASCII; fallback(obj) for what it does not handle."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asyncapy.domain._speedups",
    "The codecs' fast paths in C (see asyncapy.domain.codecs).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
