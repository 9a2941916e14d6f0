// Runs the emulator's C++ unit tests: every test whose name starts with one of the arguments.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "check.h"

int main(int argc, char** argv) {
  int ran = 0;
  for (const auto& test : emu_test::registry()) {
    bool selected = argc < 2;
    for (int i = 1; i < argc; ++i) {
      if (std::string(argv[i]) == "--list") {
        std::printf("%s\n", test.name);
        selected = false;
        break;
      }
      if (std::string(test.name).rfind(argv[i], 0) == 0) selected = true;
    }
    if (!selected) continue;
    const int before = emu_test::failures();
    try {
      test.body();
    } catch (const std::exception& e) {
      emu_test::report(__FILE__, __LINE__, std::string(test.name) + " threw: " + e.what());
    }
    std::printf("%s %s\n", emu_test::failures() == before ? "ok    " : "FAILED", test.name);
    ++ran;
  }
  std::printf("%d tests, %d failed checks\n", ran, emu_test::failures());
  return emu_test::failures() == 0 ? 0 : 1;
}
