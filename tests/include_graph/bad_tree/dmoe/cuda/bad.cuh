#pragma once
#include "../cpu/bad.hpp"
