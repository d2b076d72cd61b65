#!/usr/bin/perl
# An independent DKIM verifier for the tests: Perl's Mail::DKIM (Debian's libmail-dkim-perl),
# with the public keys given on the command line instead of looked up in DNS.
#
#   perl verify_dkim.pl NAME=RECORD ... -- FILE ...
#
# prints one line per signature of each file: "FILE ALGORITHM RESULT" (pass, fail, invalid …).
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS;

my %records;
while (@ARGV && $ARGV[0] ne '--') {
    my ($name, $record) = split /=/, shift @ARGV, 2;
    $records{lc $name} = $record;
}
shift @ARGV;

{
    no warnings 'redefine';
    *Mail::DKIM::DNS::query = sub {
        my ($domain, $type) = @_;
        my $record = $records{lc $domain};
        return () unless defined $record && $type eq 'TXT';
        my @strings = unpack '(A255)*', $record;  # TXT strings are at most 255 octets each
        return (Net::DNS::RR->new(name => $domain, type => 'TXT', txtdata => \@strings));
    };
}

for my $file (@ARGV) {
    open my $in, '<:raw', $file or die "$file: $!";
    my $verifier = Mail::DKIM::Verifier->new();
    local $/;
    $verifier->PRINT(<$in>);
    $verifier->CLOSE;
    close $in;
    my @signatures = $verifier->signatures;
    print "$file none none\n" unless @signatures;
    for my $signature (@signatures) {
        print "$file ", $signature->algorithm, " ", $signature->result, " ", ($signature->result_detail // ""), "\n";
    }
}
